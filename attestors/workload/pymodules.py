"""Which file `python -m <module>` runs: python's module search, followed inside the caller's root.

`python -m name` names no file: python looks for the module along sys.path, and which file it finds
depends on its working directory, its environment (PYTHONPATH and the like), its standard library
and the venv it was started from. This follows that search (as far as it is certain) with the
ProcessFiles of scriptfile.py, so every name is resolved in the caller's root and every mount is
checked before anything is asked of it. Where the search would depend on what cannot be known for
sure, it stops and finds nothing: `script:module` then stands without `script:path`.

Like everything ProcessFiles does, it blocks: it runs on the threads of an ExecutableReader's pool.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from vouchd.attestors.workload.commandline import Module
from vouchd.attestors.workload.scriptfile import ProcessFiles, ScriptFile, ScriptNotFoundError

__all__ = ["find_module"]

_DELETED_SUFFIX = " (deleted)"  # the kernel's mark on an executable replaced since exec
_PYTHON_VERSION = re.compile(r"python(\d+\.\d+)")
_VENV_VERSION = re.compile(r"(\d+\.\d+)(?:\.\d+)?.*")


@dataclass(frozen=True, slots=True)
class _Venv:
    directory: str
    system_site_packages: bool
    version: str | None


@dataclass(frozen=True, slots=True)
class _Entry:
    directory: str
    site: bool = False  # a site directory: its .pth files may add directories python searches next


def find_module(files: ProcessFiles, module: Module, *, executable: str, program: str,
                environment: Mapping[str, str] | None) -> ScriptFile | None:
    """The file `python -m <module>` runs, or None when it cannot be told for sure.

    `executable` is the interpreter as /proc/<pid>/exe reads; `program` its argv[0], through which
    python finds a venv (its pyvenv.cfg); `environment` what read_environment found, or None when it
    was not read: the variables are then taken to be unset, and where python's search depends on one
    that cannot be (HOME, for the user's site-packages) the search stops.

    python's sys.path is followed as far as it is certain: its working directory (unless -I, -P or
    PYTHONSAFEPATH), PYTHONPATH, the standard library of the interpreter's prefix, and a venv's
    site-packages (after the user's, when the venv includes the system's). The search stops before
    the system's site-packages, whose places differ between distributions, at a zipped standard
    library, after a site directory with .pth files (they can add directories to search next), and
    at a namespace package (whose portions can be anywhere further on). A .so or .pyc module that
    would shadow a .py one is not looked for.
    """
    parts = module.name.split(".")
    for entry in _search_path(files, module, executable=executable, program=program, environment=environment):
        if entry is None:
            return None
        top = _module_kind(files, entry.directory, parts[0])
        if top == "namespace":
            return None
        if top is not None:
            return _module_file(files, entry.directory, parts, top)
        if entry.site and _has_pth_files(files, entry.directory):
            return None
    return None


def _search_path(files: ProcessFiles, module: Module, *, executable: str, program: str,
                 environment: Mapping[str, str] | None) -> Iterator[_Entry | None]:
    """sys.path of `python -m` in order, as far as it can be known; None where the rest cannot."""
    variables: Mapping[str, str] = (environment or {}) if module.use_environment else {}
    if module.search_cwd and not variables.get("PYTHONSAFEPATH"):
        if files.cwd is None:
            yield None
            return
        yield _Entry(files.cwd)
    for directory in filter(None, variables.get("PYTHONPATH", "").split(":")):
        if (absolute := files.absolute(directory)) is None:
            yield None
            return
        yield _Entry(absolute)
    if variables.get("PYTHONHOME"):
        yield None  # another standard library than the interpreter's own
        return
    interpreter = files.inside(executable.removesuffix(_DELETED_SUFFIX))
    venv = _find_venv(files, program, environment)
    version_match = _PYTHON_VERSION.fullmatch(os.path.basename(interpreter or ""))
    version = version_match.group(1) if version_match else (venv.version if isinstance(venv, _Venv) else None)
    if interpreter is None or version is None:
        yield None
        return
    prefix = os.path.dirname(os.path.dirname(interpreter))
    standard_library = f"{prefix}/lib/python{version}"
    if (files.kind(f"{prefix}/lib/python{version.replace('.', '')}.zip") is not None
            or files.kind(f"{standard_library}/os.py") != "file"):
        yield None  # a zipped standard library, or not the layout assumed
        return
    yield _Entry(standard_library)
    if not isinstance(venv, _Venv):
        yield None  # not a venv (the system's site-packages), or not known to be one
        return
    if venv.system_site_packages and module.user_site and not variables.get("PYTHONNOUSERSITE"):
        # HOME counts even with -E, which only makes python ignore its own PYTHON* variables.
        home = (environment or {}).get("HOME")
        base = variables.get("PYTHONUSERBASE") or (f"{home}/.local" if home else None)
        if environment is None or base is None or (user_site := files.absolute(base)) is None:
            yield None
            return
        yield _Entry(f"{user_site}/lib/python{version}/site-packages", site=True)
    yield _Entry(f"{venv.directory}/lib/python{version}/site-packages", site=True)
    yield None  # the system's site-packages and what .pth files add


def _find_venv(files: ProcessFiles, program: str, environment: Mapping[str, str] | None) -> _Venv | bool:
    """The venv python was started from (its pyvenv.cfg next to or above the argv[0] it was started
    as), False if none, True if that cannot be told (argv[0] is a bare name and PATH was not read)."""
    if "/" in program:
        started_as = files.absolute(program)
    elif environment is not None and "PATH" in environment:
        started_as = next((candidate for directory in environment["PATH"].split(":")
                           if (candidate := files.absolute(f"{directory or '.'}/{program}")) is not None
                           and files.kind(candidate) == "file"), None)
    else:
        started_as = None
    if started_as is None:
        return True
    directory = os.path.dirname(started_as)
    for candidate in (directory, os.path.dirname(directory)):
        content = files.read_file(f"{candidate.rstrip('/')}/pyvenv.cfg")
        if content is not None:
            return _parse_pyvenv_cfg(candidate, content)
    return False


def _parse_pyvenv_cfg(directory: str, content: bytes) -> _Venv:
    settings: dict[str, str] = {}
    for line in content.decode("utf-8", errors="replace").splitlines():
        key, equals, value = line.partition("=")
        if equals:
            settings[key.strip().lower()] = value.strip()
    version = _VENV_VERSION.fullmatch(settings.get("version_info") or settings.get("version") or "")
    return _Venv(
        directory=directory,
        system_site_packages=settings.get("include-system-site-packages", "").lower() == "true",
        version=version.group(1) if version else None,
    )


def _module_kind(files: ProcessFiles, directory: str, name: str) -> str | None:
    """What `name` is in `directory` to python's path finder, in its order: a `package` (with
    __init__.py), a `module` (name.py), a `namespace` package (a directory without), or nothing."""
    if files.kind(f"{directory}/{name}/__init__.py") == "file":
        return "package"
    if files.kind(f"{directory}/{name}.py") == "file":
        return "module"
    if files.kind(f"{directory}/{name}") == "directory":
        return "namespace"
    return None


def _module_file(files: ProcessFiles, directory: str, parts: list[str], top: str) -> ScriptFile | None:
    """The file of the dotted `parts` whose first lies in `directory` as `top`: a module's .py, or a
    package's __main__.py (which is what runpy runs of a package)."""
    kind: str | None = top
    for position, part in enumerate(parts):
        if position > 0:
            kind = _module_kind(files, directory, part)
        if kind is None:
            return None
        if position < len(parts) - 1:
            if kind == "module":
                return None  # python fails: it is not a package
            directory = f"{directory}/{part}"
            continue
        name = f"{directory}/{part}.py" if kind == "module" else f"{directory}/{part}/__main__.py"
        try:
            return files.open_file(name)
        except ScriptNotFoundError:
            return None
    return None


def _has_pth_files(files: ProcessFiles, directory: str) -> bool:
    names = files.list_directory(directory)
    return names is not None and any(name.endswith(".pth") for name in names)
