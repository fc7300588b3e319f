"""Screening on a local 2-CPU Ray cluster: the same records, byte for byte, as a single-process run.

The CLI tests come first: they start (and must stop) a cluster of their own, which they cannot do while
the module's shared cluster (the ``cluster`` fixture) is up.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from personavec.cli import app  # noqa: E402
from personavec.core.errors import PersonavecError  # noqa: E402
from personavec.core.models import LoadedModel, load_model  # noqa: E402
from personavec.screen.distributed import (  # noqa: E402
    LOCAL_SYSTEM_CONFIG,
    RayOptions,
    check_reachable,
    choose_layout,
    ray_scorer,
)
from personavec.screen.run import screen  # noqa: E402
from tests.conftest import make_model, make_tokenizer  # noqa: E402
from tests.test_screen import ROWS, _jsonl, _plan, _vector  # noqa: E402

MANY_ROWS = [(f"{q} (take {i})", a) for i in range(3) for q, a in ROWS]  # 36 rows: 9 batches of 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama saved as a transformers folder, so actors load it by path."""
    folder = tmp_path_factory.mktemp("ray") / "model"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder_lm(model_dir: Path) -> LoadedModel:
    return load_model(str(model_dir))


def _ray_children() -> set[int]:
    names = ("raylet", "gcs_server", "ray::", "default_worker", "dashboard", "log_monitor", "monitor.py")
    found = set()
    for p in psutil.Process().children(recursive=True):
        try:
            text = " ".join(p.cmdline()) or p.name()
        except psutil.Error:
            continue
        if any(n in text for n in names):
            found.add(p.pid)
    return found


def _wait_until(check: object, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.25)
    return False


# -- without a cluster -------------------------------------------------------------------------------------


def test_ray_is_imported_only_when_asked_for() -> None:
    code = (
        "import sys, personavec.cli, personavec.screen.distributed, personavec.screen.run; "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_layout_fills_the_cpus_without_oversubscribing() -> None:
    assert choose_layout(2, 2, None, None) == (2, 1)
    assert choose_layout(2, 2, 1, None) == (1, 2)
    assert choose_layout(16, 8, 4, None) == (4, 4)
    assert choose_layout(16, 8, 1, None) == (1, 8)  # no actor wider than a node
    assert choose_layout(16, 8, None, 4) == (4, 4)
    with pytest.raises(PersonavecError, match="largest node"):
        choose_layout(16, 8, None, 9)


def test_bad_flags_missing_ray_and_an_unreachable_address_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(PersonavecError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        check_reachable("127.0.0.1:1")
    data = _jsonl(tmp_path / "d.jsonl")
    base = ["screen", str(data), "--vector", str(tmp_path / "v.safetensors")]
    res = CliRunner().invoke(app, [*base, "--ray-workers", "2"])
    assert res.exit_code == 2 and "need --ray or --ray-address" in res.stderr
    res = CliRunner().invoke(app, [*base, "--ray", "--ray-address", "auto"])
    assert res.exit_code == 2 and "not both" in res.stderr
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where it is not installed
    res = CliRunner().invoke(app, [*base, "--ray"])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: screening on Ray needs the ray package")


def test_cli_ray_gives_the_single_process_records_and_leaves_no_process(
    model_dir: Path, folder_lm: LoadedModel, tmp_path: Path
) -> None:
    assert not ray.is_initialized()
    vec = tmp_path / "evil.safetensors"
    _vector(folder_lm).save(vec)
    data = _jsonl(tmp_path / "d.jsonl", MANY_ROWS)
    args = ["screen", str(data), "--vector", f"{vec}@2", "--model", str(model_dir), "--cheap"]
    args += ["--batch-size", "4", "--json"]
    local = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.stderr
    before = _ray_children()
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "2"])
    assert res.exit_code == 0, res.stderr
    assert "Ray: 2 workers x 1 thread on 1 node (2 CPUs, local cluster)" in res.stderr
    assert (tmp_path / "ray" / "records.jsonl").read_bytes() == (
        tmp_path / "local" / "records.jsonl"
    ).read_bytes()
    assert not ray.is_initialized()
    assert _wait_until(lambda: _ray_children() <= before), f"Ray processes left: {_ray_children() - before}"
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o"), "--ray-address", "127.0.0.1:1"])
    assert res.exit_code == 2
    assert (
        res.stderr.strip().splitlines()[-1].startswith("error: cannot reach the Ray cluster at 127.0.0.1:1")
    )


# -- on the module's cluster -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A local 2-CPU cluster shared by the tests below (ray_scorer uses an initialised session as it is)."""
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        _system_config=LOCAL_SYSTEM_CONFIG,
    )
    yield
    ray.shutdown()


def test_full_mode_on_two_workers_writes_the_single_process_files_and_resumes(
    cluster: None, model_dir: Path, folder_lm: LoadedModel, tmp_path: Path
) -> None:
    plan = _plan(folder_lm, layers=(1, 3))
    data = _jsonl(tmp_path / "d.jsonl", MANY_ROWS)
    screen(folder_lm, data, plan, tmp_path / "local", batch_size=4, report=False)
    reference = (tmp_path / "local" / "records.jsonl").read_bytes()
    options = RayOptions(workers=2)
    with ray_scorer(str(model_dir), plan, fingerprint=folder_lm.info.fingerprint, options=options) as scorer:
        result = screen(folder_lm, data, plan, tmp_path / "ray", batch_size=4, report=False, scorer=scorer)
        assert (tmp_path / "ray" / "records.jsonl").read_bytes() == reference
        for name in ("own_answers.jsonl", "records.csv"):
            assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
        assert result.summary["timing"]["own_answers_generated"] == len(MANY_ROWS)

        # A kill half-way through the fourth batch: the rerun on Ray keeps three batches, screens the rest.
        shutil.copytree(tmp_path / "ray", tmp_path / "killed")
        lines = reference.splitlines(keepends=True)
        (tmp_path / "killed" / "records.jsonl").write_bytes(b"".join(lines[:14]) + lines[14][:20])
        resumed = screen(
            folder_lm, data, plan, tmp_path / "killed", batch_size=4, report=False, scorer=scorer
        )
    assert (tmp_path / "killed" / "records.jsonl").read_bytes() == reference
    assert (
        resumed.summary["resumed"]["kept"] == 12 and resumed.summary["timing"]["samples_screened_now"] == 24
    )


def test_ctrl_c_stops_the_actors_and_a_wrong_model_is_refused(
    cluster: None, model_dir: Path, folder_lm: LoadedModel, tmp_path: Path
) -> None:
    plan = _plan(folder_lm, cheap=True)
    data = _jsonl(tmp_path / "d.jsonl", MANY_ROWS)

    def interrupt(_done: int) -> None:
        raise KeyboardInterrupt

    options = RayOptions(workers=2)
    with (
        pytest.raises(KeyboardInterrupt),
        ray_scorer(str(model_dir), plan, fingerprint=folder_lm.info.fingerprint, options=options) as scorer,
    ):
        assert ray.available_resources().get("CPU", 0) == 0  # both CPUs held by the actors
        screen(folder_lm, data, plan, tmp_path / "out", batch_size=4, scorer=scorer, on_progress=interrupt)
    assert _wait_until(lambda: ray.available_resources().get("CPU", 0) == 2), "actors still hold the CPUs"
    assert len((tmp_path / "out" / "records.jsonl").read_text().splitlines()) == 4

    with (
        pytest.raises(PersonavecError, match="is not the driver's") as info,
        ray_scorer(str(model_dir), plan, fingerprint="0" * 16, options=RayOptions(workers=1)),
    ):
        pass
    assert "\n" not in str(info.value)
    assert _wait_until(lambda: ray.available_resources().get("CPU", 0) == 2)
