"""Which class a captured file belongs to, as VDI layering sorts a profile: apps, config or data.

Rules, first match wins:

1. **apps**: the name ends in an executable or library extension (``.exe .dll .com .sys .msi .so
   .dylib``, including versioned libraries such as ``libfoo.so.1.2``), or the file starts with an
   executable's magic number: ELF (``7f 45 4c 46``), PE/DOS (``MZ``), or Mach-O (``fe ed fa ce/cf``
   either byte order, and the universal ``ca fe ba be``, which Java class files share: they count
   as apps too).
2. **config**: registry hives and settings: ``*.reg``, ``NTUSER.DAT`` (any case, also
   ``UsrClass.dat``), ``*.ini``, ``*.conf``, ``*.plist``, and dotfiles: any path with a segment that
   starts with ``.`` (``.bashrc``, ``.config/app/settings.json``).
3. **data**: everything else.

Only names and the first bytes are looked at, so a file's class costs one short read, and an
unchanged file keeps the class it was given when it was read (see ``index``).
"""

from __future__ import annotations

APPS = "apps"
CONFIG = "config"
DATA = "data"
CLASSES = (APPS, CONFIG, DATA)

# Class codes as stored per manifest entry (see cachepoint/capture/index.py); 0: not classified
# (directories).
CODES = {APPS: 1, CONFIG: 2, DATA: 3}
NAMES = {code: name for name, code in CODES.items()}

MAGIC_BYTES = 4  # how much of a file ``classify`` wants to see
APP_EXTENSIONS = frozenset({"exe", "dll", "com", "sys", "msi", "so", "dylib"})
CONFIG_EXTENSIONS = frozenset({"reg", "ini", "conf", "plist"})
CONFIG_NAMES = frozenset({"ntuser.dat", "usrclass.dat"})
_MAGIC = (
    b"\x7fELF",
    b"\xfe\xed\xfa\xce",
    b"\xfe\xed\xfa\xcf",
    b"\xce\xfa\xed\xfe",
    b"\xcf\xfa\xed\xfe",
    b"\xca\xfe\xba\xbe",
)


def parse_classes(text: str) -> frozenset[str]:
    """``apps,config`` -> {"apps", "config"}; unknown or no names are refused by name."""
    names = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(names - set(CLASSES))
    if unknown or not names:
        raise ValueError(f"--only {text!r}: name one or more of {', '.join(CLASSES)} (not {unknown})")
    return names


def _is_app_name(name: str) -> bool:
    parts = name.lower().split(".")[1:]  # the extensions, in order ("libfoo.so.1" -> ["so", "1"])
    if not parts:
        return False
    if parts[-1] in APP_EXTENSIONS:
        return True
    # A versioned shared library: "so" followed only by numbers.
    return "so" in parts and all(p.isdigit() for p in parts[parts.index("so") + 1 :])


def is_executable_magic(head: bytes) -> bool:
    return head.startswith(b"MZ") or head[:4] in _MAGIC


def classify(path: str, head: bytes | None) -> str:
    """The class of the file at ``path`` (relative to the captured root) whose first bytes are
    ``head`` (None for entries without content: symlinks, whiteouts)."""
    name = path.rpartition("/")[2]
    if _is_app_name(name) or (head is not None and is_executable_magic(head)):
        return APPS
    lower = name.lower()
    if lower in CONFIG_NAMES or ("." in lower and lower.rpartition(".")[2] in CONFIG_EXTENSIONS):
        return CONFIG
    if any(part.startswith(".") for part in path.split("/")):
        return CONFIG
    return DATA
