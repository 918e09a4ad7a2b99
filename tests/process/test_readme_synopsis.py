"""Every option that `virtfs-mount --help`, `virtfs-controller --help` and each
`vdctl NOUN VERB --help` lists appears in the README's synopsis of that command
(issue 17 item 8: the synopses had fallen behind the parsers)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from rig import BIN, run_vdctl

from controller.cli_args import build_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
_OPT = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def help_options(text: str) -> set[str]:
    """The option strings an argparse --help lists (-h/--help left out)."""
    opts: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"^ {2}(-\S.*?)(?: {2,}|$)", line)
        if m:
            opts.update(o for o in _OPT.findall(m.group(1)) if o not in ("-h", "--help"))
    return opts


def words(text: str) -> set[str]:
    return set(_OPT.findall(text))


def program_synopsis(prog: str) -> str:
    """The README's synopsis of prog: the bullet "- `prog [...]`:"."""
    m = re.search(r"^- `" + re.escape(prog) + r" (.*?)`:", README, re.S | re.M)
    assert m, f"no synopsis of {prog} in the README"
    return m.group(1)


@pytest.mark.parametrize("prog", ["virtfs-mount", "virtfs-controller"])
def test_program_synopsis_lists_every_option(prog):
    out = subprocess.run([str(BIN / prog), "--help"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    listed = help_options(out)
    assert len(listed) > 5, out
    missing = sorted(listed - words(program_synopsis(prog)))
    assert not missing, f"{prog}: README synopsis misses {missing}"


def vdctl_synopsis() -> tuple[str, dict[tuple[str, str], str]]:
    """The README's vdctl block: its global part (the "vdctl [" lines), and the text
    of each NOUN VERB ("vdctl disk ls | info NAME" is two verbs)."""
    block = README.split("## vdctl\n", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    lines: list[str] = []
    for ln in block.splitlines():  # continuation lines are indented
        if ln.startswith(" ") and lines:
            lines[-1] += " " + ln.strip()
        else:
            lines.append(ln)
    glob = " ".join(ln for ln in lines if ln.startswith("vdctl ["))
    verbs: dict[tuple[str, str], str] = {}
    for ln in lines:
        if ln.startswith("vdctl ["):
            continue
        noun, _, rest = ln.removeprefix("vdctl ").partition(" ")
        for part in rest.split(" | "):
            verb = part.split(" ", 1)[0] if part else ""
            verbs[(noun, verb)] = verbs.get((noun, verb), "") + " " + part
    return glob, verbs


def vdctl_verbs() -> list[tuple[str, str]]:
    p = build_parser()
    nouns = next(a for a in p._actions if a.dest == "noun").choices
    out = []
    for noun, np in nouns.items():
        subs = [a for a in np._actions if a.dest == "verb"]
        out += [(noun, v) for v in subs[0].choices] if subs else [(noun, "")]
    return out


def test_vdctl_synopsis_lists_every_verb_and_option():
    glob, verbs = vdctl_synopsis()
    top = help_options(run_vdctl("--help").out) - {"--version"}
    assert not sorted(top - words(glob)), f"vdctl globals missing: {sorted(top - words(glob))}"
    problems = []
    for noun, verb in vdctl_verbs():
        if (noun, verb) not in verbs:
            problems.append(f"vdctl {noun} {verb}: no synopsis")
            continue
        own = help_options(run_vdctl(noun, *([verb] if verb else []), "--help").out) - top
        missing = sorted(own - words(verbs[(noun, verb)]))
        if missing:
            problems.append(f"vdctl {noun} {verb}: misses {missing}")
    assert not problems, "\n".join(problems)


def test_the_check_can_fail():
    """The oracle: an option the README does not name is caught."""
    assert "--no-such-option" not in words(program_synopsis("virtfs-mount"))
    _glob, verbs = vdctl_synopsis()
    assert "--thick" in words(verbs[("disk", "create")])
    assert "--thick" not in words(verbs[("disk", "rm")])
    assert help_options("  -n, --dry-run   x\n  --size SIZE\n  -h, --help\n") == {
        "-n", "--dry-run", "--size"}
