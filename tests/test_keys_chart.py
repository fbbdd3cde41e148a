"""The chart's optional team key-admin Roles (rbac.teamKeyAdmins): the shipped Role, per team."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.test_chart import CHART, ROOT, helm, kinds, render, template_args


def test_team_key_admin_roles_are_the_shipped_role_bound_per_team(tmp_path: Path) -> None:
    assert not [d for d in render() if d["metadata"]["name"].endswith("-key-admin")]  # opt-in
    values = tmp_path / "teams.yaml"
    subjects = {
        "team-a": [{"kind": "Group", "name": "team-a-admins", "apiGroup": "rbac.authorization.k8s.io"}],
        "team-b": [{"kind": "ServiceAccount", "name": "ci", "namespace": "team-b"}],
    }
    teams = [{"namespace": ns, "subjects": s} for ns, s in subjects.items()]
    values.write_text(yaml.safe_dump({"rbac": {"teamKeyAdmins": teams}}))
    docs = render([values])
    shipped = yaml.safe_load((ROOT / "deploy" / "team-key-admin.yaml").read_text())
    roles = [d for d in kinds(docs, "Role") if d["metadata"]["name"].endswith("-key-admin")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert role["rules"] == shipped["rules"]
    bindings = [d for d in kinds(docs, "RoleBinding") if d["metadata"]["name"].endswith("-key-admin")]
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": roles[0]["metadata"]["name"],
        }
        assert binding["subjects"] == subjects[binding["metadata"]["namespace"]]
    assert len(bindings) == 2


def test_team_key_admins_schema_rejects_a_team_without_subjects(tmp_path: Path) -> None:
    values = tmp_path / "bad.yaml"
    values.write_text(yaml.safe_dump({"rbac": {"teamKeyAdmins": [{"namespace": "team-a"}]}}))
    out = helm(*template_args([values]), check=False)
    assert out.returncode != 0 and "subjects" in out.stderr
    assert (CHART / "templates" / "team-key-admins.yaml").is_file()
