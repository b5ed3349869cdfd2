"""`virtc template ...` and `virtc factory ...` commands that need no VM."""

from __future__ import annotations

import json
import os

import pytest
import typer
from typer.testing import CliRunner

from virtcontainers.cli.factory_cmds import factory_app, template_app
from virtcontainers.errors import ConfigError
from virtcontainers.factory import CacheUnavailableError, TemplateError, TemplateStore


@pytest.fixture
def cli() -> typer.Typer:
    root = typer.Typer()

    @root.callback()
    def _root() -> None:
        """Test root."""

    root.add_typer(template_app, name="template")
    root.add_typer(factory_app, name="factory")
    return root


def test_template_list_empty_and_broken(cli: typer.Typer, run_root: str) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["template", "list"])
    assert res.exit_code == 0 and "templates" in res.output
    os.makedirs(TemplateStore(run_root=run_root).template_dir("half"))
    res = runner.invoke(cli, ["template", "list"])
    assert res.exit_code == 0
    assert "half" in res.output and "broken" in res.output


def test_template_rm_unknown_is_an_error(cli: typer.Typer, run_root: str) -> None:
    res = CliRunner().invoke(cli, ["template", "rm", "ghost"])
    assert isinstance(res.exception, TemplateError)
    assert "no such template: ghost" in str(res.exception)


def test_template_rm_removes(cli: typer.Typer, run_root: str) -> None:
    store = TemplateStore(run_root=run_root)
    os.makedirs(store.template_dir("half"))
    res = CliRunner().invoke(cli, ["template", "rm", "half"])
    assert res.exit_code == 0 and "removed template half" in res.output
    assert store.list() == []


def test_factory_status_without_a_server(cli: typer.Typer, run_root: str) -> None:
    res = CliRunner().invoke(cli, ["factory", "status"])
    assert isinstance(res.exception, CacheUnavailableError)
    assert "virtc factory init" in str(res.exception)


def test_factory_init_refuses_config_options_with_a_template(
    cli: typer.Typer, run_root: str
) -> None:
    res = CliRunner().invoke(cli, ["factory", "init", "--template", "t1", "--cpus", "2"])
    assert isinstance(res.exception, ConfigError)
    assert "the VM config is the template's" in str(res.exception)


def test_factory_init_with_a_missing_template_fails_with_the_reason(
    cli: typer.Typer, run_root: str
) -> None:
    res = CliRunner().invoke(cli, ["factory", "init", "--template", "ghost", "--size", "1"])
    assert res.exception is not None
    assert "exited with code" in str(res.exception)
    assert "no such template: ghost" in str(res.exception)
    assert not os.path.exists(os.path.join(run_root, "factory", "cache.pid"))


def test_factory_destroy_without_a_server(cli: typer.Typer, run_root: str) -> None:
    res = CliRunner().invoke(cli, ["factory", "destroy"])
    assert res.exit_code == 0 and "stopped" in res.output


def test_template_create_refuses_other_hypervisors(cli: typer.Typer, run_root: str) -> None:
    root = typer.Typer()

    @root.callback()
    def _root(ctx: typer.Context) -> None:
        """Root with -H firecracker."""
        from virtcontainers.cli.app import Globals

        ctx.obj = Globals(hypervisor="firecracker")

    root.add_typer(template_app, name="template")
    res = CliRunner().invoke(root, ["template", "create", "t1"])
    assert isinstance(res.exception, ConfigError)
    assert "QEMU only" in str(res.exception)
    assert json.dumps  # keep the import used by the JSON tests below


def test_template_list_json(cli: typer.Typer, run_root: str) -> None:
    root = typer.Typer()

    @root.callback()
    def _root(ctx: typer.Context) -> None:
        """Root with --json."""
        from virtcontainers.cli.app import Globals

        ctx.obj = Globals(json=True)

    root.add_typer(template_app, name="template")
    os.makedirs(TemplateStore(run_root=run_root).template_dir("half"))
    res = CliRunner().invoke(root, ["template", "list"])
    assert res.exit_code == 0
    [entry] = json.loads(res.output)
    assert entry["name"] == "half" and entry["ok"] is False and "incomplete" in entry["problem"]


@pytest.mark.parametrize("flag", ["--kernel", "--initrd"])
def test_template_create_refuses_a_missing_asset(
    cli: typer.Typer, run_root: str, flag: str
) -> None:
    res = CliRunner().invoke(cli, ["template", "create", "t1", flag, "/no/such/file"])
    assert isinstance(res.exception, ConfigError)
    assert f"{flag}: no such file /no/such/file" in str(res.exception)
    assert TemplateStore(run_root=run_root).list() == []
