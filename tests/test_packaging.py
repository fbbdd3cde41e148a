"""The import names: `kubellm.router` and `kubellm.operator`, and no shadowing of the standard library."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_repo_root_on_the_path_does_not_shadow_stdlib_operator() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
    code = "import operator, kubellm.router, kubellm.operator; print(operator.__file__)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "site-packages" not in out.stdout and str(ROOT) not in out.stdout


def test_tests_import_the_package_not_the_folders() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").rglob("*.py")
        if any(
            line.lstrip().startswith(("from router", "import router", "from operator.", "import operator."))
            for line in path.read_text().splitlines()
        )
    ]
    assert offenders == [], "import kubellm.router / kubellm.operator instead"


def test_error_logs_carry_the_exception_type_not_its_traceback() -> None:
    code = (
        "import logging, time\n"
        "from kubellm.router.observability._logging import configure\n"
        "configure('info')\n"
        "try:\n"
        "    secret = 'sk-local-value'\n"
        "    raise ValueError(secret)\n"
        "except ValueError:\n"
        "    logging.getLogger('kubellm.router').exception('failed %s', 'here')\n"
        "time.sleep(0.2)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert '"msg":"failed here","error":"ValueError"' in out.stderr
    assert "Traceback" not in out.stderr and "sk-local-value" not in out.stderr
