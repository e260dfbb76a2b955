"""The guides must stay true to the script.

docs/GUIDE.md, docs/GUIDE.zh-CN.md, README.md and README.zh-CN.md name constants, options and commands in
inline code and code blocks. Each of those names must exist: constants in CONFIG_NAMES, options in
the --help of the command they are used with, commands in the script's command table. The two
guides must also keep the same sections and both show the model as a Mermaid diagram.
"""

import ast
import functools
import re

import pytest

import rine_plus_ssca as rps
from conftest import REPO

GUIDES = [REPO / "docs" / "GUIDE.md", REPO / "docs" / "GUIDE.zh-CN.md"]
CHINESE_README = REPO / "README.zh-CN.md"
DOCUMENTS = GUIDES + [REPO / "README.md", CHINESE_README]

# UPPER_CASE names the documents may show that are not configuration constants.
NOT_CONSTANTS = {
    "CUDA",  # the GPU platform
    "HF_ENDPOINT",  # environment variable read by huggingface_hub (mirror)
    "HF_HUB_OFFLINE",  # environment variable read by huggingface_hub (no network)
    "CUBLAS_WORKSPACE_CONFIG",  # environment variable set by DETERMINISTIC
    "OMP_NUM_THREADS",  # environment variable: CPU threads per process
    "CUDA_VISIBLE_DEVICES",  # environment variable: the GPUs a process sees
    "HF_HOME",  # environment variable read by huggingface_hub (cache folder)
    "PYTHONPATH",  # environment variable: where Python finds modules
    "CONFIG_NAMES",  # the script's list of constants
    "ARCHITECTURE", "INPUTS", "RUN", "SCORING",  # what a constant affects, in its declare(...)
}

COMMAND_NAMES = ("eval", "predict", "check-data", "export", "import-rine", "compare")
SCRIPT = "rine_plus_ssca.py"


# --------------------------------------------------------------------------- reading Markdown

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
INLINE = re.compile(r"(`+)(.+?)\1", re.S)


def code_blocks(text):
    """[(language, body)] for every fenced block."""
    return [(match.group(1).strip(), match.group(2)) for match in FENCE.finditer(text)]


def inline_spans(text):
    """Every inline code span outside fenced blocks."""
    return [match.group(2).strip() for match in INLINE.finditer(FENCE.sub("", text))]


def code_lines(text):
    """Inline spans, then code-block lines (backslash continuations joined)."""
    lines = inline_spans(text)
    for _, body in code_blocks(text):
        lines += body.replace("\\\n", " ").splitlines()
    return lines


@pytest.fixture(scope="module", params=DOCUMENTS, ids=lambda path: path.name)
def document(request):
    path = request.param
    assert path.is_file(), f"{path} is missing"
    return path, path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- constants

WORD = re.compile(r"(?<![A-Za-z0-9_.\-/])([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+|[A-Z][A-Z0-9]+)(?![A-Za-z0-9_])")


def constant_like_names(text):
    """UPPER_CASE names in code that look like configuration constants.

    A name with an underscore (PROJ_DIM, HF_ENDPOINT) always counts. A single word (XI, LR,
    EPOCHS) counts when it is a whole inline span or is assigned (XI=0, XI = 0.2); otherwise
    it is taken for an acronym (CLIP, DCT, BCE) in a diagram or a printed message.
    """
    names = set()
    for span in inline_spans(text):
        if re.fullmatch(r"[A-Z][A-Z0-9_]+", span):
            names.add(span)
    for line in code_lines(text):
        for match in WORD.finditer(line):
            name = match.group(1)
            rest = line[match.end():]
            if "_" in name or re.match(r"\s*=", rest):
                names.add(name)
    return names


def test_every_constant_named_exists(document):
    path, text = document
    names = constant_like_names(text)
    classes = {name for name in names if isinstance(getattr(rps, name, None), type)}  # `SSCA`, the card's module
    unknown = sorted(names - set(rps.CONFIG_NAMES) - NOT_CONSTANTS - classes)
    assert not unknown, f"{path.name} names constants that rine_plus_ssca.py does not have: {unknown}"


@pytest.mark.parametrize("guide", GUIDES, ids=lambda path: path.name)
def test_the_constants_documented_are_found(guide):
    # The extraction itself must work, in Chinese text as in English: each guide names the main constants.
    names = constant_like_names(guide.read_text(encoding="utf-8"))
    for name in ("PROJ_DIM", "XI", "BLOCKS", "USE_TIE", "SUPCON_TEMPERATURE", "SELECT_METRIC"):
        assert name in names, name


# --------------------------------------------------------------------------- options and commands

OPTION = re.compile(r"(?<![A-Za-z0-9_\-])(--[a-z][a-z0-9\-]*)")


@pytest.fixture(scope="module")
def help_options(help_texts):
    """{command or 'train': set of option strings in its --help} (conftest's help_texts)."""
    assert set(help_texts) == {"train", *COMMAND_NAMES}
    return {command: set(OPTION.findall(text)) for command, text in help_texts.items()}


def command_of(line):
    """For a line that runs the script: the command name ('train' when none); else None."""
    match = re.search(re.escape(SCRIPT) + r"(?:\s+(\S+))?", line)
    if not match:
        return None
    word = match.group(1) or ""
    return word if re.fullmatch(r"[a-z][a-z\-]*", word) else "train"


def test_every_command_named_exists(document):
    path, text = document
    for line in code_lines(text):
        command = command_of(line)
        if command is not None and command != "train":
            assert command in {**rps.COMMANDS, **rps.TOOL_COMMANDS}, f"{path.name}: unknown command {command!r} in {line!r}"


def test_every_option_named_exists(document, help_options):
    path, text = document
    every_option = set().union(*help_options.values())
    for line in code_lines(text):
        command = command_of(line)
        if command is not None:
            line = line[line.index(SCRIPT):]
            allowed = help_options.get(command, set())
            where = f"`python {SCRIPT} {'' if command == 'train' else command + ' '}--help`"
        elif line.startswith("--"):  # an option on its own, e.g. `--no-use-tie`
            allowed, where = every_option, "any --help of the script"
        else:  # another program's command line (pip, pytest, git)
            continue
        for option in OPTION.findall(line):
            assert option in allowed, f"{path.name}: {option} (in {line!r}) is not in {where}"


def test_option_values_are_among_the_choices(document):
    # `--fusion concat`, `--select-metric ap`: a value outside CHOICES would be refused by the script.
    path, text = document
    for line in code_lines(text):
        for name, allowed in rps.CHOICES.items():
            for value in re.findall(re.escape("--" + name.lower().replace("_", "-")) + r"[ =]([A-Za-z0-9_]+)", line):
                assert value in allowed, f"{path.name}: {value!r} is not a choice of {name} {allowed} in {line!r}"


@pytest.mark.parametrize("guide", GUIDES, ids=lambda path: path.name)
def test_the_options_documented_are_found(help_options, guide):
    text = guide.read_text(encoding="utf-8")
    found = {option for line in code_lines(text) for option in OPTION.findall(line)}
    for option in ("--no-use-spectral", "--no-use-tie", "--fusion", "--xi", "--spectral-input", "--lr"):
        assert option in found, option
    for command in COMMAND_NAMES:
        assert any(command_of(line) == command for line in code_lines(text)), f"no example of {command}"


# --------------------------------------------------------------------------- structure

def level2_headings(text):
    return re.findall(r"^## .+$", FENCE.sub("", text), re.M)


def test_both_guides_have_the_same_sections_and_a_diagram():
    english, chinese = (path.read_text(encoding="utf-8") for path in GUIDES)
    assert len(level2_headings(english)) == len(level2_headings(chinese)), (
        level2_headings(english), level2_headings(chinese))
    assert len(level2_headings(english)) >= 7
    for path, text in zip(GUIDES, (english, chinese)):
        assert any(language == "mermaid" for language, _ in code_blocks(text)), f"{path.name} has no mermaid block"


def test_chinese_readme_links_to_the_chinese_guide():
    text = CHINESE_README.read_text(encoding="utf-8")
    assert "docs/GUIDE.zh-CN.md" in text
    assert "HF_ENDPOINT" in text and "--demo" in text


# --------------------------------------------------------------------------- quoted messages

# The beginnings of the lines the script prints that the documents quote: errors, warnings, notes, and the
# lines training and eval print about calibration, the stored threshold and the feature cache.
MESSAGE_QUOTE = re.compile(r"^(error: |warning: |note: |calibration: |stored threshold |feature cache for )")
CHINESE = re.compile(r"[\u3000-\u303f\u3400-\u9fff\uff00-\uffef]")  # CJK characters and full-width punctuation
SOURCES = [REPO / SCRIPT, *sorted((REPO / "rine_plus_ssca_tools").glob("*.py"))]  # the script and its package


def quoted_messages(text):
    """Lines in code that quote the script's output: they start as one of its messages does (MESSAGE_QUOTE)."""
    lines = [line.strip() for chunk in code_lines(text) for line in chunk.splitlines()]  # indented fences come as one span
    return [line for line in lines if MESSAGE_QUOTE.match(line)]


def _string_assignments(function):
    """{name: expression} for names a function assigns once (message parts such as `fix`, `kept`)."""
    assigned = {}
    for node in _own_nodes(function):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            assigned[name] = None if name in assigned else node.value
    return {name: value for name, value in assigned.items() if value is not None}


def _own_nodes(function):
    """The nodes of a function's body, without those of functions defined inside it."""
    pending = list(function.body)
    while pending:
        node = pending.pop()
        yield node
        pending += [child for child in ast.iter_child_nodes(node) if not isinstance(child, ast.FunctionDef)]


def _pattern(node, names, seen=()):
    """(regex, number of literal characters) for a string expression; anything computed is a wildcard."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return re.escape(node.value), len(node.value)
    if isinstance(node, ast.JoinedStr):
        parts = [_pattern(value, names, seen) for value in node.values]
        return "".join(p for p, _ in parts), sum(n for _, n in parts)
    if isinstance(node, ast.FormattedValue):
        if isinstance(node.value, ast.Name) and node.value.id in names and node.value.id not in seen:
            return _pattern(node.value, names, seen)
        return ".*", 0
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        (left, n_left), (right, n_right) = _pattern(node.left, names, seen), _pattern(node.right, names, seen)
        return left + right, n_left + n_right
    if isinstance(node, ast.IfExp):  # either branch may be printed
        (body, n_body), (orelse, n_orelse) = _pattern(node.body, names, seen), _pattern(node.orelse, names, seen)
        return f"(?:{body}|{orelse})", min(n_body, n_orelse)
    if isinstance(node, ast.Name) and node.id in names and node.id not in seen:
        return _pattern(names[node.id], names, seen + (node.id,))
    return ".*", 0


def script_message_patterns():
    """A regex per message the script (or a command of its package) can print: the first argument of every
    call that builds a string (print, UserError, ...). A UserError is printed as 'error: <message>'."""
    trees = [ast.parse(path.read_text(encoding="utf-8")) for path in SOURCES]
    patterns = []
    for function in [n for tree in trees for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        names = _string_assignments(function)
        for call in _own_nodes(function):
            if not isinstance(call, ast.Call) or not call.args:
                continue
            regex, literal = _pattern(call.args[0], names)
            if literal >= 20:  # a bare f"error: {error}" would match anything
                is_error = isinstance(call.func, ast.Name) and call.func.id == "UserError"
                patterns.append(re.compile(("error: " if is_error else "") + regex, re.S))
    return patterns


@pytest.fixture(scope="module")
def message_patterns():
    return script_message_patterns()


def printed_by_the_script(quote, patterns):
    return any(pattern.fullmatch(quote) for pattern in patterns)


ELLIPSIS = re.compile(r"(?<![^\s=])\.\.\.(?!\S)")  # "..." alone or after "=": the quote leaves out what stands there


@functools.lru_cache(maxsize=None)
def source_text():
    return "\n".join(path.read_text(encoding="utf-8") for path in SOURCES)


def printed_as_quoted(quote, patterns):
    """The script prints no Chinese: a quote holding some was translated or made up, whatever a wildcard matches.
    A quote with '...' standing for computed parts (`note: ... images under ... are in no real/fake folder ...`)
    must have its other parts, in that order, on one line of the sources ('error: ' is added to every
    UserError when it is printed)."""
    if CHINESE.search(quote):
        return False
    if not ELLIPSIS.search(quote):  # "..." inside a word, e.g. load_detector(..., clip_model=...), is printed as it is
        return printed_by_the_script(quote, patterns)
    for text in {quote, quote.removeprefix("error: ")}:
        parts = [re.escape(part.strip()) for part in ELLIPSIS.split(text) if part.strip()]
        if parts and re.search(".*".join(parts), source_text()):
            return True
    return False


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: path.name)
def test_every_quoted_message_is_one_the_script_prints(path, message_patterns):
    stale = [quote for quote in quoted_messages(path.read_text(encoding="utf-8"))
             if not printed_as_quoted(quote, message_patterns)]
    assert not stale, f"{path.name} quotes messages that rine_plus_ssca.py does not print (run it, copy the output): {stale}"


@pytest.mark.parametrize("guide", GUIDES, ids=lambda path: path.name)
def test_the_quote_check_tells_current_from_stale_messages(message_patterns, guide):
    quotes = quoted_messages(guide.read_text(encoding="utf-8"))
    assert len(quotes) >= 5 and any("non-finite" in quote for quote in quotes)
    assert any(quote.startswith("calibration: ") for quote in quotes)
    current = ("error: The loss became non-finite (NaN/inf) at epoch 1, step 2. Lower LR (now 1000000.0) or try "
               "--amp off; no checkpoint was written yet.")
    assert printed_by_the_script(current, message_patterns)
    for stale in (current.replace("try --amp off", "try --no-amp"), current.replace("yet.", "yet, sorry."),
                  "error: The loss became NaN at step 2.", "warning: nothing to see here, this text is made up"):
        assert not printed_by_the_script(stale, message_patterns), stale


def test_a_log_line_half_translated_into_chinese_is_stale(message_patterns):
    # The wildcards of a computed message match anything, Chinese included; the check must not let that pass.
    template = "calibration: temperature T fitted on N validation images; validation binary ECE over P(fake) before -> after"
    assert printed_as_quoted(template, message_patterns)
    half_translated = template.replace("before -> after", "校准前 -> 校准后")
    assert printed_by_the_script(half_translated, message_patterns)  # what the old check accepted
    assert not printed_as_quoted(half_translated, message_patterns)


def test_a_quote_cut_short_must_start_as_a_message_does(message_patterns):
    assert printed_as_quoted("error: CUDA ran out of memory at batch size ...", message_patterns)
    assert printed_as_quoted("warning: possible shortcut: ...", message_patterns)
    assert not printed_as_quoted("error: CUDA is out of memory ...", message_patterns)
    assert not printed_as_quoted("warning: possible shortcut 快捷方式 ...", message_patterns)
    assert printed_as_quoted("note: ... images under ... are in no real/fake folder ...", message_patterns)
    assert not printed_as_quoted("note: ... images under ... are in no labelled folder ...", message_patterns)
