"""Hydra hooks: what goes wrong before the task function runs ends in one line, as the run's own errors do.

``CheckOutputDir`` refuses an output directory that cannot be created; ``one_line_config_errors`` turns
Hydra's composition errors (a misspelt option or key, a value of the wrong type, a malformed override)
into one ``error: ...`` line. ``HYDRA_FULL_ERROR=1`` still shows Hydra's report with the full trace.
"""

import contextlib
import dataclasses
import difflib
import enum
import os
import re
import sys
import tempfile
import types
import typing

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException, SearchPathException
from hydra.experimental.callback import Callback

# what Hydra raises while it composes the config (and parses overrides), before the task function runs
COMPOSITION_ERRORS = (ConfigCompositionException, OverrideParseException, SearchPathException)


def check_writable_dir(path: str, key: str) -> None:
    """Create ``path`` if needed and prove it writable, or exit with one line naming ``key``."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        sys.exit(f"error: {key}={path} cannot be used as the output directory ({error.strerror or error})")


class CheckOutputDir(Callback):
    """Hydra creates the run (or sweep) directory before the task starts, and a path that cannot be
    created ends there in a traceback; this says in one line which setting to change instead."""

    def on_run_start(self, config, **kwargs) -> None:
        check_writable_dir(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        check_writable_dir(config.hydra.sweep.dir, "hydra.sweep.dir")


# -- composition errors -------------------------------------------------------------------------
def _full_error() -> bool:
    """Hydra's own switch for its complete report (hydra._internal.utils._is_env_set)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _command() -> str:
    """How the user started the app, for the hint: ``python train.py`` or ``ddpo-train``."""
    program = sys.argv[0] if sys.argv else ""
    return f"python {os.path.basename(program)}" if program.endswith(".py") else os.path.basename(program) or "train"


def _schema_type(full_key: str):
    """The annotated type of ``full_key`` in the config schema, or None for a key the schema does not type."""
    from ddpo.config import Config

    node: typing.Any = Config
    for name in full_key.split("."):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return None
        fields = {f.name: f for f in dataclasses.fields(node)}
        if name not in fields:
            return None
        node = typing.get_type_hints(node)[name]
    return None if node is typing.Any else node


def _describe(kind) -> str | None:
    """``kind`` (a schema type) in words: what a value must be."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        named = [_describe(a) for a in typing.get_args(kind) if a is not type(None)]
        if len(named) == 1 and named[0]:
            return f"{named[0]} or null"
        return None
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return "one of " + ", ".join(member.name for member in kind)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind)


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def _wrong_value(exc: ConfigCompositionException) -> str | None:
    """``Error merging override key=value`` (a value the schema's type refuses): the key and what it takes."""
    cause = exc.__cause__
    key = getattr(cause, "full_key", None)
    if not key or not str(exc).startswith("Error merging override"):
        return None
    override = str(exc).partition("override ")[2].strip()
    kind = _schema_type(key)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        names = [f.name for f in dataclasses.fields(kind)]
        return f"{key} is a group of keys ({', '.join(names)}), not a value: set one, e.g. {key}.{names[0]}=..."
    expected = _describe(kind)
    if expected is None:
        return f"{override}: {_first_line(getattr(cause, 'msg', '') or cause)}"
    return f"{key} must be {expected} (got {cause.value!r})"


def _unknown_key(exc: ConfigCompositionException) -> str | None:
    """``Could not override 'key'`` (a key neither the schema nor the group's config has)."""
    match = re.match(r"Could not override '([^']+)'\.", str(exc))
    if not match:
        return None
    addition = re.search(r"use (\+\S+)", str(exc))
    add = f"; a new key is added with {addition.group(1)}" if addition else ""
    return f"unknown config key {match.group(1)!r} (check its spelling{add}; {_command()} --cfg job lists every key)"


def _missing_option(exc: MissingConfigException) -> str | None:
    """``Could not find 'group/option'``: name the options the group has."""
    missing = exc.missing_cfg_file
    first = _first_line(str(exc))
    if not missing or "Could not find" not in first:
        return None
    where, _, what = first.rpartition(": ")
    where = "" if where in ("", "In 'config'") else f"{where[:1].lower()}{where[1:]}: "
    group, _, name = missing.rpartition("/")
    return f"{where}{what[:1].lower()}{what[1:]} ({_options_hint(group, name, list(exc.options or []))})"


OPTIONS_LISTED = 240  # characters of option names an error line lists before it names close matches only


def _options_hint(group: str, name: str, options: list[str]) -> str:
    """The group's options when they fit on the line; otherwise the close matches and where the rest are listed."""
    if not options:
        return f"no config group {group!r}"
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
    guess = f"did you mean {' or '.join(close)}? " if close else ""
    listed = ", ".join(options)
    if len(listed) <= OPTIONS_LISTED:
        return f"{guess}options of {group}: {listed}"
    return f"{guess}{group} has {len(options)} options, listed by {_command()} --help"


def _parse_detail(message: str) -> str:
    """The parser's reason, without the grammar's token list, the caret line and the link."""
    for line in message.splitlines():
        line = line.strip()
        if not line or line.startswith(("Error parsing override", "See https:", "^")):
            continue
        if line.startswith("LexerNoViableAltException"):
            return "a character that needs quoting, or an unclosed quote"
        return re.sub(r"\s+expecting\s+\{.*\}$", "", line)
    return "not an override"


def composition_error_line(exc: Exception) -> str:
    """Hydra's multi-line composition error as one line that names the key, option or override."""
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the override {exc.override!r} ({_parse_detail(exc.message)}): the form is key=value"
    line = None
    if isinstance(exc, MissingConfigException):
        line = _missing_option(exc)
    elif isinstance(exc, ConfigCompositionException):
        line = _wrong_value(exc) or _unknown_key(exc)
    if line:
        return line
    # any other report: its sentences on one line, without the search path Hydra appends
    text = str(exc).split("\nConfig search path:")[0].split("\nSearch path:")[0]
    lines = [part.strip() for part in text.splitlines() if part.strip()]
    cause = exc.__cause__
    if cause is not None and _first_line(getattr(cause, "msg", "") or cause):
        lines.append(_first_line(getattr(cause, "msg", "") or cause))
    return " ".join(lines) or type(exc).__name__


def _raised_by_the_task(exc: BaseException) -> bool:
    """True when ``exc`` passed through Hydra's ``run_job``: the task function's own, not composition's."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "run_job" and tb.tb_frame.f_globals.get("__name__") == "hydra.core.utils":
            return True
        tb = tb.tb_next
    return False


def _exit_if_composition_error(exc: BaseException) -> None:
    """End the process with one line when ``exc`` is Hydra's report of a config it could not compose.

    Hydra also raises a bare ValueError for some overrides (``model=null``); only what it raises before
    the task function runs counts, so a bug in the run keeps its traceback.
    """
    if _full_error() or not isinstance(exc, (*COMPOSITION_ERRORS, ValueError)) or _raised_by_the_task(exc):
        return
    sys.exit(f"error: {composition_error_line(exc)}")


def _one_line(func):
    """Run ``func`` (one of Hydra's steps); a composition error ends the process with one line."""
    try:
        return func()
    except Exception as exc:
        _exit_if_composition_error(exc)
        raise


@contextlib.contextmanager
def one_line_config_errors():
    """Around a ``hydra.main`` app: composition errors end in one ``error: ...`` line and exit status 1.

    Hydra composes the config inside ``hydra._internal.utils.run_and_report``, which prints such an error
    over several lines (with its HYDRA_FULL_ERROR hint) and exits before the task function could catch it;
    each step it runs there is wrapped here, so the error is reported first, in one line. ``--help`` and
    ``--info`` compose outside it: what escapes them is reported the same way.
    """
    import hydra._internal.hydra as hydra_app
    import hydra._internal.utils as hydra_utils

    original = hydra_utils.run_and_report

    def run_and_report(func):
        return original(lambda: _one_line(func))

    hydra_utils.run_and_report = hydra_app.run_and_report = run_and_report
    try:
        yield
    except Exception as exc:
        _exit_if_composition_error(exc)
        raise
    finally:
        hydra_utils.run_and_report = hydra_app.run_and_report = original
