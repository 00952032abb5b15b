"""ansible/ stays valid: the playbook parses with the example inventory, and ansible-lint's strictest
profile passes (ansible-core and ansible-lint live in .venv-ansible: `make ansible-tools`)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import REPO

ANSIBLE_DIR = REPO / "ansible"
ANSIBLE_BIN = REPO / ".venv-ansible" / "bin"

pytestmark = pytest.mark.skipif(
    not (ANSIBLE_BIN / "ansible-lint").exists(), reason="needs .venv-ansible: make ansible-tools"
)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{ANSIBLE_BIN}:{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
    env["ANSIBLE_CONFIG"] = str(ANSIBLE_DIR / "ansible.cfg")
    return subprocess.run(argv, cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=600)


def test_site_yml_passes_the_syntax_check_with_the_example_inventory() -> None:
    proc = run(str(ANSIBLE_BIN / "ansible-playbook"), "--syntax-check", "-i", "inventory/example", "site.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_playbook_and_roles_pass_ansible_lint_production_profile() -> None:
    proc = run(str(ANSIBLE_BIN / "ansible-lint"), "--offline", "--profile", "production")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr
