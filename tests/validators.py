"""Run the DICOM validators (dciodvfy, dsrdump, PixelMed DicomSRValidator) and parse them.

Each runner writes nothing itself: it takes a file path and returns a
:class:`Findings` with the errors and warnings found in the tool's output. The
parsers are deliberately suspicious:

- dciodvfy: lines starting ``Error`` are errors, ``Warning`` warnings.
- dsrdump: lines ``E:`` are errors, ``W:`` warnings; a non-zero exit status is an error.
- PixelMed: ``Error:`` lines are errors, and so is any line saying ``illegal
  relationship`` (PixelMed prints those without the prefix); ``Warning:`` lines are
  warnings, and ``Content Item not in template`` counts as an error (an item the
  template lacks).

Tests whitelist warnings by exact text (:func:`unexpected`), so a new warning fails.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DSRDUMP_ALWAYS",
    "PIXELMED_JAR",
    "Findings",
    "have_dciodvfy",
    "have_dsrdump",
    "have_pixelmed",
    "run_dciodvfy",
    "run_dsrdump",
    "run_pixelmed_sr",
    "run_pixelmed_sr_many",
    "unexpected",
]

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")

#: The one warning dsrdump (DCMTK 3.6.7) prints for every Mammography CAD SR.
DSRDUMP_ALWAYS = "W: Check for template constraints not yet supported"

_TIMEOUT_S = 120


@dataclass
class Findings:
    """What one validator said about one file."""

    tool: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str = ""

    def __str__(self) -> str:
        head = f"{self.tool}: {len(self.errors)} errors, {len(self.warnings)} warnings"
        return f"{head}\n{self.output}"


def have_dciodvfy() -> bool:
    """Whether dicom3tools' dciodvfy is on PATH."""
    return shutil.which("dciodvfy") is not None


def have_dsrdump() -> bool:
    """Whether DCMTK's dsrdump is on PATH."""
    return shutil.which("dsrdump") is not None


def have_pixelmed() -> bool:
    """Whether java and the PixelMed jar are installed."""
    return shutil.which("java") is not None and PIXELMED_JAR.is_file()


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False, errors="replace"
    )


def run_dciodvfy(path: Path | str) -> Findings:
    """Run ``dciodvfy FILE``; ``Error`` lines are errors, ``Warning`` lines warnings."""
    proc = _run(["dciodvfy", str(path)])
    out = proc.stdout + proc.stderr
    found = Findings("dciodvfy", output=out)
    for line in out.splitlines():
        text = line.strip()
        if text.startswith("Error"):
            found.errors.append(text)
        elif text.startswith("Warning"):
            found.warnings.append(text)
    return found


def run_dsrdump(path: Path | str) -> Findings:
    """Run ``dsrdump FILE``; ``E:``/``F:`` lines are errors, ``W:`` lines warnings."""
    proc = _run(["dsrdump", str(path)])
    out = proc.stdout + proc.stderr
    found = Findings("dsrdump", output=out)
    for line in out.splitlines():
        text = line.strip()
        if text.startswith(("E:", "F:")):
            found.errors.append(text)
        elif text.startswith("W:"):
            found.warnings.append(text)
    if proc.returncode != 0:
        found.errors.append(f"exit status {proc.returncode}")
    return found


_PIXELMED_JAVA_OPTIONS = [
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
]

_SEPARATOR = "=== calcnode file: "

# DicomSRValidator's main takes one file, and compiling its XSL costs most of the run
# (10-25 s). This driver (run with java's single-file source launcher) validates many
# files with one validator. validate(file, describe, matchCase, checkAmbiguousTemplate,
# checkContentItemOrder, checkTemplateID).
_DRIVER = """
import com.pixelmed.validate.DicomSRValidator;

public class CalcnodeSRValidate {
    public static void main(String[] args) throws Exception {
        boolean order = Boolean.parseBoolean(args[0]);
        DicomSRValidator validator = new DicomSRValidator();
        for (int i = 1; i < args.length; ++i) {
            System.out.println("SEPARATOR" + args[i]);
            try {
                System.out.print(validator.validate(args[i], false, true, false, order, false));
            } catch (Exception e) {
                System.out.println("Error: exception " + e);
            }
            System.out.flush();
        }
    }
}
""".replace("SEPARATOR", _SEPARATOR)


def _parse_pixelmed(out: str) -> Findings:
    found = Findings("pixelmed", output=out)
    for line in out.splitlines():
        text = line.strip()
        if not text:
            continue
        if (
            text.startswith("Error")
            or re.search(r"illegal relationship", text, re.IGNORECASE)
            or "Content Item not in template" in text
        ):
            found.errors.append(text)
        elif text.startswith("Warning"):
            found.warnings.append(text)
        elif re.search(r"exception", text, re.IGNORECASE):
            found.errors.append(text)
    return found


def run_pixelmed_sr(path: Path | str) -> Findings:
    """Run PixelMed's DicomSRValidator (IOD and root templates TID 1500 / TID 4000)."""
    proc = _run(
        [
            "java",
            *_PIXELMED_JAVA_OPTIONS,
            "-cp",
            str(PIXELMED_JAR),
            "com.pixelmed.validate.DicomSRValidator",
            str(path),
        ]
    )
    found = _parse_pixelmed(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        found.errors.append(f"exit status {proc.returncode}")
    return found


def run_pixelmed_sr_many(
    paths: list[Path], *, check_content_item_order: bool = True
) -> dict[Path, Findings]:
    """Validate several SR files in one JVM; also checks content item order by default.

    Returns
    -------
    dict
        One :class:`Findings` per path; a file the driver never reached gets an error.
    """
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "CalcnodeSRValidate.java"
        source.write_text(_DRIVER, encoding="utf-8")
        proc = subprocess.run(
            [
                "java",
                *_PIXELMED_JAVA_OPTIONS,
                "-cp",
                str(PIXELMED_JAR),
                str(source),
                "true" if check_content_item_order else "false",
                *[str(p) for p in paths],
            ],
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S * 3,
            check=False,
            errors="replace",
        )
    chunks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in proc.stdout.splitlines():
        if line.startswith(_SEPARATOR):
            current = chunks.setdefault(line[len(_SEPARATOR) :], [])
        elif current is not None:
            current.append(line)
    results: dict[Path, Findings] = {}
    for path in paths:
        lines = chunks.get(str(path))
        if lines is None:
            results[path] = Findings(
                "pixelmed",
                errors=[f"not validated (exit {proc.returncode})"],
                output=proc.stdout + proc.stderr,
            )
        else:
            results[path] = _parse_pixelmed("\n".join(lines))
    return results


def unexpected(warnings: list[str], allowed: set[str] | frozenset[str]) -> list[str]:
    """The warnings not in ``allowed`` (exact text after stripping)."""
    return [w for w in warnings if w.strip() not in allowed]
