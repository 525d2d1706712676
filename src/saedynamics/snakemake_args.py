"""`python -m saedynamics snakemake ...`: Snakemake, after two checks that the workflow cannot make.

Snakemake reads `--configfile` and `--config` before it runs any Snakefile, so no code of the
workflow sees them first: a missing or unreadable config file ends in Snakemake's traceback, and a
dotted key (`--config training.n_latents=32`) is refused. This entry point
1. reads every `--configfile` (it exists, is YAML, is a mapping) and names the file if not;
2. rewrites each dotted `--config` key into the mapping form Snakemake takes
   (`training.n_latents=32` -> `training={n_latents: '32'}`; Snakemake merges mappings given for
   the same top-level key, and the workflow reads '32' as the number the schema wants there);
and then hands every argument, in order and otherwise unchanged, to Snakemake's own `main`.
The config itself is validated by the workflow (workflow/rules/common.smk), as with plain
`snakemake`.
"""

from __future__ import annotations

import re
import sys

import yaml

from saedynamics.config import read_config_file
from saedynamics.errors import ConfigError

CONFIGFILE_FLAGS = ("--configfile", "--configfiles")
CONFIG_FLAGS = ("--config", "-C")
KEY = re.compile(r"[A-Za-z_][\w-]*")  # one part of a key (Snakemake's identifier, plus "-")


def dotted_entry(entry: str) -> str:
    """One `--config` entry with a dotted key in Snakemake's mapping form; others unchanged."""
    key, eq, value = entry.partition("=")
    if not eq or "." not in key:
        return entry  # Snakemake's own parsing (its message names a missing "=")
    parts = key.split(".")
    if not all(KEY.fullmatch(part) for part in parts):
        raise ConfigError(
            f"--config {entry}: {key!r} is no key; write a dotted key of names, e.g. "
            "training.n_latents=32 or architectures.topk.k=16"
        )
    try:  # as Snakemake reads the inside of a mapping: every scalar a string
        leaf = None if value == "" else yaml.load(value, Loader=yaml.BaseLoader)
    except yaml.YAMLError:
        raise ConfigError(
            f"--config {entry}: the value {value!r} is not valid YAML (quote it for the shell, "
            "e.g. training.seeds='[0, 1]')"
        ) from None
    for part in reversed(parts[1:]):
        leaf = {part: leaf}
    inner = yaml.safe_dump(leaf, default_flow_style=True, width=float("inf")).strip()
    return f"{parts[0]}={inner}"


def check_arguments(argv: list[str]) -> list[str]:
    """`argv` with dotted --config keys rewritten, after reading every --configfile."""
    out, option = [], None  # option: the flag whose values follow (as Snakemake's nargs reads them)
    for arg in argv:
        flag, eq, inline = arg.partition("=")
        if arg.startswith("--") and eq and flag in CONFIGFILE_FLAGS + CONFIG_FLAGS:
            out.append(f"{flag}={_checked(flag, inline)}")  # --config=a.b=1: this value alone
            option = None
        elif arg.startswith("-"):
            out.append(arg)
            option = arg if arg in CONFIGFILE_FLAGS + CONFIG_FLAGS else None
        else:
            out.append(_checked(option, arg) if option else arg)
    return out


def _checked(flag: str, value: str) -> str:
    """A --configfile value, read (ConfigError naming it if it cannot be); a --config entry, with
    a dotted key rewritten."""
    if flag in CONFIG_FLAGS:
        return dotted_entry(value)
    try:
        read_config_file(value)
    except ConfigError as e:
        raise ConfigError(f"{flag} {value}: {e}") from None
    return value


def run_snakemake(argv: list[str]) -> int:
    """Check the arguments (an error: its message, exit 1), then run Snakemake with them."""
    try:
        argv = check_arguments(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from snakemake.cli import main

    main(argv)  # exits with Snakemake's own status
    return 0
