"""Hydra entry points shared by every `python -m selfflow_robot.<command>`.

Configs live in the top-level `configs/` folder, installed as the package
`selfflow_robot.configs`. `run(name, main)` parses `key=value` overrides with Hydra
(so `--help`, `--cfg job` and multirun work as Hydra users expect) and calls
`main(cfg)`. `compose(name, overrides)` builds the same config in-process (tests).
An optional leading verb (`bench params model=xl`) is passed to main as cfg.verb.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib.resources
import os
import sys
from typing import Callable, Iterator

from omegaconf import DictConfig, OmegaConf, open_dict

CONFIG_DIR = str(importlib.resources.files("selfflow_robot.configs"))
# What bad input raises (a missing path, a value or file that does not fit; DataError and
# ObservationError are ValueErrors): one line naming the problem, not a traceback.
# A diverged run (trainer.NonFiniteError, a FloatingPointError) also ends in one line: it names the
# non-finite values and the last good checkpoint. A missing optional package (ImportError) says how to install it.
# A policy server that cannot be reached (ConnectionError) or refuses the key (PermissionError) names its URL.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError, FloatingPointError,
               ImportError, ConnectionError, PermissionError)
# ${first_set:${run_dir},outputs/...}: Hydra's run dir is the run_dir given, else a fresh folder,
# so a call with run_dir=... leaves no stray outputs/<command>/<time>/ behind.
OmegaConf.register_new_resolver("first_set", lambda *xs: next((x for x in xs if x not in (None, "")), None),
                                replace=True)


def _pop_verb(argv: list[str], verbs: tuple[str, ...]) -> str | None:
    if verbs and len(argv) > 1 and argv[1] in verbs:
        return argv.pop(1)
    if verbs and len(argv) > 1 and not argv[1].startswith("-") and "=" not in argv[1]:
        close = difflib.get_close_matches(argv[1], verbs, n=1)
        raise SystemExit(f"error: unknown command '{argv[1]}'" + (f" (did you mean {close[0]}?)" if close else "")
                         + f"; expected one of: {', '.join(verbs)}")
    return None


def _with_verb(cfg: DictConfig, verb: str | None) -> DictConfig:
    if verb is not None:
        with open_dict(cfg):
            cfg.verb = verb
    return cfg


def short_warnings() -> None:
    """Our own advice (UserWarnings raised in this package) prints as `warning: ...`, without the
    file, line and echoed source line that Python's default format adds for developers."""
    import warnings

    default = warnings.formatwarning

    def fmt(message, category, filename, lineno, line=None):
        if category is UserWarning and f"{os.sep}selfflow_robot{os.sep}" in filename:
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = fmt


def run(config_name: str, main: Callable[[DictConfig], object], verbs: tuple[str, ...] = ()) -> None:
    """Parse sys.argv with Hydra and call main(cfg)."""
    import hydra

    short_warnings()

    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        print(command_help(config_name, verbs))
        raise SystemExit(0)
    verb = _pop_verb(sys.argv, verbs)
    if verbs and verb is None and not any(a.startswith("-") for a in sys.argv[1:]):
        module = sys.modules["__main__"].__spec__.name.removesuffix(".__main__")  # `-m pkg` runs pkg.__main__
        raise SystemExit(f"usage: python -m {module} {{{'|'.join(verbs)}}} [key=value ...]")
    overrides = _overrides_to_check(sys.argv[1:])
    if overrides is not None:  # also under -m and --cfg: Hydra itself accepts any +key
        check_overrides(config_name, [a for a in overrides if not a.lstrip("+~").startswith("hydra.")])

    @hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base="1.3")
    def _entry(cfg: DictConfig) -> None:
        with reported_errors():
            main(_with_verb(cfg, verb))

    _entry()


# Hydra's flags: those followed by a value, and those that only print (nothing to check then).
_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--experimental-rerun")
_OTHER_CONFIG = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
_PRINT_ONLY = ("--info", "-i", "--shell-completion", "-sc", "--hydra-help", "--version")


def _overrides_to_check(args: list[str]) -> list[str] | None:
    """The key=value overrides among Hydra's flags, with each sweep (-m a=1,2) reduced to its first
    value, so the keys are checked as in a single run; None where another config or only
    Hydra's own output is asked for."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in _OTHER_CONFIG or name in _PRINT_ONLY:
            return None
        if name in _FLAGS_WITH_VALUE:
            skip = "=" not in a
        elif not a.startswith("-"):
            out.append(a)
    if not any(a in ("-m", "--multirun") for a in args):
        return out
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(out)
    except Exception:  # Hydra reports a malformed override itself
        return None
    return [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else o.input_line
            for o in parsed]


RESUME_HINT = ("finished work is kept (written checkpoints, evaluation records, stored episodes); "
               "the same command with resume=true continues")


@contextlib.contextmanager
def reported_errors(interrupted: str = RESUME_HINT) -> Iterator[None]:
    """Bad input ends with one `error: ...` line, Ctrl-C with one line and exit code 130."""
    from omegaconf.errors import MissingMandatoryValue

    from .interrupts import deliver_swallowed_interrupts

    try:
        with deliver_swallowed_interrupts():  # a Ctrl-C during garbage collection is not lost
            yield
    except MissingMandatoryValue as e:  # a `???` key the command needs, e.g. policy=
        key = getattr(e, "full_key", None) or "a required key"
        raise SystemExit(f"error: {key} is not set: pass {key}=... (--help lists the options)") from None
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"error: {e}\n(HYDRA_FULL_ERROR=1 shows the traceback)") from None
    except KeyboardInterrupt as e:  # a command may say in the exception what it kept
        print(f"\ninterrupted: {str(e) or interrupted}", file=sys.stderr)
        raise SystemExit(130) from None


def compose(config_name: str, overrides: list[str] | None = None, verb: str | None = None) -> DictConfig:
    """Build a config exactly as the command line would, without Hydra's run-dir handling."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=False)
    return _with_verb(cfg, verb)


def config_leaves(d: dict, prefix: str = ""):
    """(dotted key, value) for every leaf of a nested dict (an empty dict is a leaf)."""
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from config_leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _dotted(cfg, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        out.append(f"{prefix}{k}")
        if isinstance(v, dict):
            out += _dotted(v, f"{prefix}{k}.")
    return out


# Option names a user may reach for, and what the configs call them (RLDS datasets name cameras by
# their feature path in dataset.rlds.image; LeRobot ones in dataset.camera).
_SYNONYMS = {"camera": ("image",), "cameras": ("image", "camera"), "image": ("camera",)}


def check_overrides(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose once up front, so a misspelt key is one `error:` line with a suggestion (Hydra's own
    text suggests `+key=`, which would add the typo and ignore it), and `+new_key=` at the top
    level, which no command reads, is refused."""
    from hydra.errors import HydraException

    base = compose(config_name)
    top_level = [o for o in overrides
                 if "=" in o and not o.startswith(("+", "~")) and "." not in o.split("=", 1)[0]]
    try:  # the keys of the groups chosen (dataset=rt1 has dataset.rlds.*), not only the defaults'
        chosen = compose(config_name, top_level)
    except HydraException:
        chosen = base
    keys = _dotted(OmegaConf.to_container(chosen, resolve=False))

    def hint(key: str) -> str:
        leaf = key.rsplit(".", 1)[-1]
        same_meaning = [k for k in keys if k.startswith(key.split(".", 1)[0] + ".")
                        and k.rsplit(".", 1)[-1] in _SYNONYMS.get(leaf, ())]
        close = same_meaning or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        return f" (did you mean {close[0]}?)" if close else ""

    try:
        cfg = compose(config_name, overrides)
    except HydraException as e:
        lines = str(e).strip().splitlines()
        bad = lines[0].split("'")[1] if lines[0].startswith("Could not override '") else None
        if bad and bad not in keys:
            raise SystemExit(f"error: unknown option {bad}{hint(bad)}; `--help` lists the options") from None
        options = [ln.strip() for ln in lines if ln.startswith("\t") and "=" not in ln]
        if "Available options in" in str(e) and options:  # a group option that does not exist (model=nope)
            raise SystemExit(f"error: {lines[0].split(': ', 1)[-1]}; choose from {', '.join(options)}") from None
        if lines[0].startswith("Ambiguous value"):  # a,b: Hydra's own advice follows on the next lines
            raise SystemExit(f"error: {lines[0]}: write a list as key=[a,b], or quote a string with commas") from None
        cause = f" ({str(e.__cause__).splitlines()[0]})" if e.__cause__ else ""
        raise SystemExit(f"error: {lines[0]}{cause}") from None
    unknown = sorted(set(cfg) - set(base))
    if unknown:
        raise SystemExit(f"error: unknown option {unknown[0]}{hint(unknown[0])}; `--help` lists the options")
    added = [k for k in _added_keys(overrides) if "." in k and k not in keys and not _read_if_added(k)]
    if added:  # +section.key=: Hydra adds it, and nothing would read it
        key = added[0]
        parent, leaf = key.rsplit(".", 1)
        siblings = [k[len(parent) + 1:] for k in keys if k.startswith(parent + ".") and "." not in k[len(parent) + 1:]]
        close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
        elsewhere = _group_options_reading(config_name, key, OmegaConf.select(chosen, key.split(".")[0] + ".name"))
        raise SystemExit(f"error: unknown option {key}" + (f" (did you mean {parent}.{close[0]}?)" if close else "")
                         + f"; nothing reads it" + (f" with {elsewhere[0]} (only {elsewhere[1]} read it)" if elsewhere else "")
                         + " (`--help` lists the options)")
    return cfg


def _group_options_reading(config_name: str, key: str, chosen: str | None) -> tuple[str, str] | None:
    """("dataset=store", "dataset=lerobot, dataset=rlds") when other options of the key's group
    have the key (e.g. dataset.on_error), else None."""
    import yaml

    group, rest = key.split(".", 1)
    if group not in _groups_used(config_name) or not chosen:
        return None
    root = importlib.resources.files("selfflow_robot.configs") / group
    having = []
    for f in sorted(root.iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml") and f.name[:-5] != chosen:
            node = yaml.safe_load(f.read_text()) or {}
            for part in rest.split("."):
                node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
            if node is not KeyError:
                having.append(f"{group}={f.name[:-5]}")
    return (f"{group}={chosen}", ", ".join(having)) if having else None


# Sections where +KEY= may add what the config files leave out: free-form maps, and sections whose
# reader checks the keys itself with a suggestion (the trainer, the logger, bench's policy_bench,
# Policy.load's options).
_OPEN_SECTIONS = ("hydra", "openpi_keys", "trainer", "logger", "policy_bench", "policy_kwargs")


def _added_keys(overrides: list[str]) -> list[str]:
    return [o.split("=", 1)[0].lstrip("+") for o in overrides if o.startswith("+") and "=" in o]


def _read_if_added(key: str) -> bool:
    """Whether something reads `key` although the composed config lacks it."""
    section, _, rest = key.partition(".")
    if section in _OPEN_SECTIONS:
        return True
    if section == "model":  # any ModelConfig field (e.g. +model.qk_norm=true)
        import dataclasses

        from selfflow_robot.models.config import ModelConfig

        return rest in {f.name for f in dataclasses.fields(ModelConfig)}
    return False


def _groups_used(config_name: str) -> dict[str, str | None]:
    """{group: default option} of the command's defaults list (not every group in configs/)."""
    import yaml

    text = (importlib.resources.files("selfflow_robot.configs") / f"{config_name}.yaml").read_text()
    out = {}
    for entry in (yaml.safe_load(text) or {}).get("defaults") or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if not key.startswith("override "):
                    out[key.removeprefix("optional ")] = value
    return out


def command_help(config_name: str, verbs: tuple[str, ...] = ()) -> str:
    """`--help`: the groups this command composes (Hydra's own help lists every group of the
    shared config folder, most of which a command never reads) and its config files with their
    comments: the command's own, then each group's default option."""
    root = importlib.resources.files("selfflow_robot.configs")
    groups = _groups_used(config_name)
    lines = [f"usage: python -m selfflow_robot.{config_name} " + (f"{{{'|'.join(verbs)}}} " if verbs else "")
             + ("[group=option ...] " if groups else "") + "[key=value ...]", ""]
    if groups:
        lines.append("groups (group=option; the default in brackets):")
        for group, default in groups.items():
            options = sorted(f.name[:-5] for f in (root / group).iterdir() if f.name.endswith(".yaml"))
            lines.append(f"  {group}: " + ", ".join(f"[{o}]" if o == default else o for o in options))
        lines.append("")
    lines += [f"options and defaults (configs/{config_name}.yaml):", "",
              (root / f"{config_name}.yaml").read_text().rstrip(), ""]
    for group, default in groups.items():
        if default:
            lines += [f"{group}={default} (configs/{group}/{default}.yaml; set its keys as {group}.KEY):", "",
                      (root / group / f"{default}.yaml").read_text().rstrip(), ""]
    lines.append("flags: --cfg job (print the composed config and exit), -m/--multirun (sweeps), "
                 "HYDRA_FULL_ERROR=1 (tracebacks)")
    return "\n".join(lines)


def compose_argv(config_name: str, argv: list[str]) -> DictConfig:
    """compose() for commands that run other commands in-process (quickstart, study), which
    cannot sit inside @hydra.main; `--help` prints the config file, `--cfg job` the composed one."""
    short_warnings()
    if "--help" in argv or "-h" in argv:
        print(command_help(config_name))
        raise SystemExit(0)
    show = "--cfg" in argv
    overrides = [a for i, a in enumerate(argv) if a != "--cfg" and not (i and argv[i - 1] == "--cfg")]
    bad = [a for a in overrides if a.startswith("-")]
    if bad:
        raise SystemExit(f"unknown option {bad[0]}: use key=value overrides, --help or --cfg job")
    cfg = check_overrides(config_name, overrides)
    if show:
        print(OmegaConf.to_yaml(cfg, resolve=False))
        raise SystemExit(0)
    return cfg


def hydra_run_dir() -> str | None:
    """The Hydra output directory of the current job, or None outside @hydra.main."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except Exception:
        return None


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
