"""Where ONNX Runtime's C/C++ headers are, and whether they suit the installed onnxruntime.

No package on PyPI or npm carries these headers, so the build uses what a user already has,
in this order:
1. ORT_INCLUDE_DIR (a folder holding onnxruntime_cxx_api.h);
2. the folders package managers install them to: Homebrew's `onnxruntime` on macOS
   (`brew --prefix onnxruntime`, /opt/homebrew, /usr/local), the `Microsoft.ML.OnnxRuntime`
   NuGet package (build/native/include) or vcpkg (installed/<triplet>/include) on Windows,
   a distribution's dev package on Linux (/usr/include/onnxruntime, /usr/local/include/onnxruntime);
3. on a Debian-like system, Debian trixie's `libonnxruntime-dev`, fetched with `apt-get download`
   into a private apt state under the build folder and unpacked with `dpkg -x` (no root, no
   system install).
The headers must be no newer than the installed onnxruntime: the library asks the runtime for
the headers' API version (ORT_API_VERSION), which an older runtime does not have.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

from .errors import BuildError, log

HEADER = "onnxruntime_cxx_api.h"
C_HEADER = "onnxruntime_c_api.h"
HEADER_PACKAGE = "libonnxruntime-dev"
HEADER_SUITE = "trixie"  # the Debian release whose libonnxruntime-dev has the headers we build with
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
NUGET_ID = "microsoft.ml.onnxruntime"  # NuGet's global packages folder uses lower-case ids


def holds_headers(folder: Path) -> bool:
    return (folder / HEADER).is_file() and (folder / C_HEADER).is_file()


def _version_key(name: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def _layouts(include: Path) -> list[Path]:
    """An include root and the subfolders packages put the headers in."""
    return [include / "onnxruntime", include / "onnxruntime" / "core" / "session", include]


def _brew_prefix() -> str | None:
    if shutil.which("brew") is None:
        return None
    try:
        out = subprocess.run(["brew", "--prefix", "onnxruntime"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def candidate_dirs(system: str | None = None, env=None, root: Path = Path("/"),
                   brew_prefix: str | None = None, search_dirs=()) -> list[Path]:
    """Folders that may hold the headers on `system` (platform.system() names), best first.
    `root` prefixes the fixed system folders and `env` replaces os.environ (for tests);
    `search_dirs` are extra folders whose NuGet `packages` subfolder is searched (Windows)."""
    system = system or platform.system()
    env = os.environ if env is None else env
    found: list[Path] = []
    if system == "Darwin":
        prefixes = [Path(brew_prefix)] if brew_prefix else []
        prefixes += [root / "opt/homebrew/opt/onnxruntime", root / "opt/homebrew",
                     root / "usr/local/opt/onnxruntime", root / "usr/local"]
        for prefix in prefixes:
            found += _layouts(prefix / "include")
    elif system == "Windows":
        # NuGet: the global packages folder (<id>/<version>/...) and a solution's packages
        # folder (<Id>.<version>/...), newest version first.
        nuget_roots = [env.get("NUGET_PACKAGES")]
        if env.get("USERPROFILE"):
            nuget_roots.append(str(Path(env["USERPROFILE"]) / ".nuget" / "packages"))
        for nuget in filter(None, nuget_roots):
            versions = sorted((Path(nuget) / NUGET_ID).glob("*"), key=lambda p: _version_key(p.name), reverse=True)
            found += [v / "build" / "native" / "include" for v in versions]
        for folder in search_dirs:
            packages = sorted(Path(folder, "packages").glob("Microsoft.ML.OnnxRuntime.[0-9]*"),
                              key=lambda p: _version_key(p.name), reverse=True)
            found += [p / "build" / "native" / "include" for p in packages]
        for vcpkg in filter(None, [env.get("VCPKG_ROOT"), env.get("VCPKG_INSTALLATION_ROOT")]):
            for triplet in sorted(Path(vcpkg, "installed").glob("*-windows*")):
                found += _layouts(triplet / "include")
    else:  # Linux and other Unixes: a distribution's dev package
        for include in (root / "usr/include", root / "usr/local/include"):
            found += _layouts(include)
    return found


def header_api_version(folder: Path) -> int:
    """ORT_API_VERSION of the headers in folder."""
    try:
        text = (folder / C_HEADER).read_text(errors="replace")
    except OSError as e:
        raise BuildError(f"cannot read {folder / C_HEADER}: {e.strerror}",
                         fix="point ORT_INCLUDE_DIR at a folder holding ONNX Runtime's headers") from None
    match = re.search(r"^\s*#\s*define\s+ORT_API_VERSION\s+(\d+)", text, re.M)
    if not match:
        raise BuildError(f"{folder / C_HEADER} does not define ORT_API_VERSION (not ONNX Runtime's C API header?)",
                         fix="point ORT_INCLUDE_DIR at the include folder of an ONNX Runtime release")
    return int(match.group(1))


def installed_runtime_version() -> str | None:
    """The installed onnxruntime Python package's version (None when it is not installed)."""
    from importlib import metadata

    for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                 "onnxruntime-qnn", "ort-nightly"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        import onnxruntime

        return onnxruntime.__version__
    except Exception:
        return None


def runtime_api_version(version: str) -> int:
    """The C API version an onnxruntime release serves: its minor number (1.21.0 -> 21)."""
    numbers = _version_key(version)
    return numbers[1] if len(numbers) >= 2 and numbers[0] == 1 else 10**6


def check_version(folder: Path, runtime_version: str | None) -> int:
    """Raises BuildError (one line) when the headers are newer than the runtime; returns their API version."""
    api = header_api_version(folder)
    if runtime_version is not None and api > runtime_api_version(runtime_version):
        raise BuildError(
            f"ONNX Runtime headers in {folder} are API version {api} (onnxruntime 1.{api}), newer than the "
            f"installed onnxruntime {runtime_version}, which cannot serve that API",
            fix=f"pip install 'onnxruntime>=1.{api}', or set ORT_INCLUDE_DIR to headers of onnxruntime "
                f"{runtime_version} or older")
    return api


def _no_headers_error(system: str) -> BuildError:
    fixes = {
        "Darwin": "brew install onnxruntime, or set ORT_INCLUDE_DIR to a folder holding onnxruntime_cxx_api.h",
        "Windows": "nuget install Microsoft.ML.OnnxRuntime (or vcpkg install onnxruntime), or set ORT_INCLUDE_DIR "
                   "to its build\\native\\include folder",
    }
    fix = fixes.get(system, "install your distribution's onnxruntime development package, or set ORT_INCLUDE_DIR "
                            "to a folder holding onnxruntime_cxx_api.h")
    return BuildError(f"cannot find ONNX Runtime's C/C++ headers (onnxruntime_cxx_api.h) on this {system} system",
                      fix=fix)


def find_include_dir(cache: Path, system: str | None = None, env=None, root: Path = Path("/"),
                     runtime_version: str | None = "installed", allow_download: bool = True) -> Path:
    """The folder holding onnxruntime_cxx_api.h for the build (see the module docstring)."""
    system = system or platform.system()
    env = os.environ if env is None else env
    if runtime_version == "installed":
        runtime_version = installed_runtime_version()
    explicit = env.get("ORT_INCLUDE_DIR")
    if explicit:
        path = Path(explicit)
        if not holds_headers(path):
            raise BuildError(f"ORT_INCLUDE_DIR={explicit} does not hold onnxruntime_cxx_api.h and onnxruntime_c_api.h",
                             fix="set ORT_INCLUDE_DIR to the folder that holds onnxruntime_cxx_api.h, or unset it")
        check_version(path, runtime_version)
        return path
    brew = _brew_prefix() if system == "Darwin" and root == Path("/") else None
    present = [d for d in candidate_dirs(system, env, root, brew, [Path.cwd(), Path(__file__).resolve().parent.parent])
               if holds_headers(d)]
    too_new = None
    for folder in present:  # the first whose version the runtime serves
        try:
            check_version(folder, runtime_version)
            return folder
        except BuildError as e:
            too_new = too_new or e
    fetched = cache / "root" / "usr" / "include" / "onnxruntime"
    if holds_headers(fetched):
        check_version(fetched, runtime_version)
        return fetched
    if too_new is not None:
        raise too_new
    if allow_download and system == "Linux" and shutil.which("apt-get") and shutil.which("dpkg"):
        folder = fetch_debian_headers(cache)
        check_version(folder, runtime_version)
        return folder
    raise _no_headers_error(system)


# ---- Debian: apt-get download libonnxruntime-dev ----------------------------------------------

def _debian_mirror() -> str:
    """The Debian archive URI this machine's apt already uses (so no host is hard-coded)."""
    candidates = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        uri = None
        for line in Path(path).read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "URIs":
                uri = value.split()[0] if value.split() else None
            if key.strip() == "Suites" and uri:
                candidates.append((uri, value.split()))
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if not os.path.exists(path):
            continue
        for line in Path(path).read_text(errors="replace").splitlines():
            words = line.split("#")[0].split()
            if words and words[0] == "deb":
                words = [w for w in words[1:] if not w.startswith("[")]
                if len(words) >= 2:
                    candidates.append((words[0], [words[1]]))
    for uri, suites in candidates:
        if uri.rstrip("/").endswith("/debian") and not any(s.endswith("-security") for s in suites):
            return uri
    raise BuildError("cannot fetch ONNX Runtime's C/C++ headers: no Debian archive found in /etc/apt sources",
                     fix="install onnxruntime's headers and set ORT_INCLUDE_DIR to the folder holding onnxruntime_cxx_api.h")


def fetch_debian_headers(dest: Path) -> Path:
    if not os.path.exists(KEYRING):
        raise BuildError(f"cannot fetch ONNX Runtime's headers: the Debian archive keyring {KEYRING} is missing",
                         fix="apt-get install debian-archive-keyring, or set ORT_INCLUDE_DIR")
    state = dest / "apt"
    for sub in ("lists/partial", "archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    sources_list = state / "sources.list"
    sources_list.write_text(f"deb [signed-by={KEYRING}] {_debian_mirror()} {HEADER_SUITE} main\n")
    apt_options = [
        f"-oDir::State={state}", "-oDir::State::status=/dev/null", f"-oDir::Cache={state}",
        f"-oDir::Etc::SourceList={sources_list}", "-oDir::Etc::SourceParts=/dev/null",
        "-oDebug::NoLocking=1", "-oAPT::Sandbox::User=root" if os.geteuid() == 0 else "-oAPT::Sandbox::User=",
        "-qq",
    ]
    log(f"fetching ONNX Runtime headers: apt-get download {HEADER_PACKAGE} ({HEADER_SUITE})")
    for args in (["update"], ["download", HEADER_PACKAGE]):
        result = subprocess.run(["apt-get", *apt_options, *args], cwd=state, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"cannot fetch ONNX Runtime's headers: `apt-get {' '.join(args)}` failed:\n"
                             f"{result.stderr.strip()[-2000:]}",
                             fix="set ORT_INCLUDE_DIR to a folder holding onnxruntime_cxx_api.h to skip the download")
    debs = sorted(state.glob(f"{HEADER_PACKAGE}_*.deb"))
    if not debs:
        raise BuildError(f"apt-get download {HEADER_PACKAGE} produced no .deb file", fix="set ORT_INCLUDE_DIR")
    unpacked = dest / "root"
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(unpacked)], check=True)
    include = unpacked / "usr" / "include" / "onnxruntime"
    if not holds_headers(include):
        raise BuildError(f"{debs[-1].name} has no onnxruntime_cxx_api.h", fix="set ORT_INCLUDE_DIR")
    return include
