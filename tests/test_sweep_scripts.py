"""scripts/run_jobs.py (parallel, resumable job runner) and scripts/toy_erasure_sweep.py (its job lists)."""

import json
import shlex

import pytest

from var_erase.toy.pairs import replacements_for

from ._scripts import load_script

pytestmark = pytest.mark.slow  # a script / app / benchmark / real-evaluator test: `make test-slow`


def _script(name):
    return load_script(f"scripts/{name}.py")


def _training(cmd: str):
    """What examples/train_svare.py parses from a generated training command."""
    argv = shlex.split(cmd)
    assert argv[:2] == ["python", "examples/train_svare.py"]
    return load_script("examples/train_svare.py").parse_args(argv[2:])


def _evaluation(cmd: str) -> dict[str, list[str]]:
    """A generated examples/toy/evaluate_many.py command as flag -> values (a bare flag has no value)."""
    argv = shlex.split(cmd)
    assert argv[:2] == ["python", "examples/toy/evaluate_many.py"]
    flags: dict[str, list[str]] = {}
    for token in argv[2:]:
        if token.startswith("--"):
            name = token[2:]
            flags.setdefault(name, [])
        else:
            flags[name].append(token)
    return flags


def test_jobs_run_in_order_stop_at_a_failure_and_resume(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    counter = tmp_path / "count"
    lines = [{"name": "ok", "cmds": [f"echo one >> {counter}", "echo made > {D}/out.txt"]},
             {"name": "bad", "cmds": ["exit 3", "echo never > {D}/never.txt"]},
             {"name": "late", "cmds": ["echo late"], "estimate_s": 1e9}]
    jobs.write_text("\n".join(json.dumps(j) for j in lines))
    run_jobs = _script("run_jobs")
    out = tmp_path / "sweep"
    results = {r["name"]: r for r in run_jobs.main([str(jobs), "--parallel", "2", "--deadline_s", "100",
                                                    "--output_dir", str(out)])}
    assert results["ok"]["rc"] == 0 and (out / "ok" / "out.txt").read_text() == "made\n"
    assert results["bad"]["rc"] == 3 and len(results["bad"]["seconds"]) == 1
    assert not (out / "bad" / "never.txt").exists()
    assert results["late"] == {"name": "late", "rc": None, "skipped": "deadline"}
    run_jobs.main([str(jobs), "--output_dir", str(out), "--deadline_s", "100"])  # again: 'ok' is not rerun
    assert counter.read_text() == "one\n"
    ledger = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in ledger].count("bad") == 2 and [r["name"] for r in ledger].count("ok") == 1


def test_bad_job_files_are_refused(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"name": "a", "cmds": ["true"]}) + "\n" + json.dumps({"name": "a", "cmds": []}))
    with pytest.raises(SystemExit, match="unique"):
        _script("run_jobs").main([str(jobs), "--output_dir", str(tmp_path / "o")])


def test_sweep_job_list_trains_then_evaluates_on_both_splits():
    jobs = _script("toy_erasure_sweep").main(["--recipes", "tri-cos900,five-const1500", "--seeds", "2,5", "--base"])
    assert [j["name"] for j in jobs] == ["base-tri", "base-five", "tri-cos900-s2", "five-const1500-s2",
                                         "tri-cos900-s5", "five-const1500-s5"]
    train, test, validation = jobs[2]["cmds"]
    args = _training(train)
    assert (args.seed, args.lr_scheduler, args.output_dir, args.concept) == (2, "cosine", "{D}", ["triangle"])
    test, validation = _evaluation(test), _evaluation(validation)
    assert test["lora"] == validation["lora"] == ["{D}"]  # both splits evaluate the adapter just trained
    assert (test["seed"], validation["seed"], test["prompts_per_concept"]) == (["0"], ["1"], ["48"])
    assert test["output_json"] != validation["output_json"]
    five = _evaluation(jobs[3]["cmds"][1])
    assert five["target_concept"] == ["triangle", "circle", "square", "star", "heart"]
    assert five["prompts_per_concept"] == ["32"]
    assert "base" in _evaluation(jobs[0]["cmds"][0]) and "lora" not in _evaluation(jobs[0]["cmds"][0])
    with pytest.raises(SystemExit, match="unknown recipe"):
        _script("toy_erasure_sweep").main(["--recipes", "tri-sgd"])


def test_sweep_runs_one_concept_recipes_on_other_concepts_of_their_kind():
    sweep = _script("toy_erasure_sweep")
    jobs = sweep.main(["--recipes", "tri-cos900,out-cos1500", "--concepts", "star,dotted", "--seeds", "0", "--base"])
    assert [j["name"] for j in jobs] == ["base-star", "base-dotted", "tri-cos900-star-s0", "out-cos1500-dotted-s0"]
    star_train, star_test, _ = jobs[2]["cmds"]
    star = _training(star_train)
    assert star.concept == ["star"] and star.retain_prompts_per_concept == 48  # the triangle recipe, on the star
    assert _evaluation(star_test)["target_concept"] == ["star"] and _evaluation(star_test)["lora"] == ["{D}"]
    dotted = _training(jobs[3]["cmds"][0])
    assert dotted.concept == ["dotted"] and dotted.max_train_steps == 1500
    with pytest.raises(SystemExit, match="no recipe given is a colour recipe"):
        sweep.main(["--recipes", "tri-cos900", "--concepts", "red"])
    with pytest.raises(SystemExit, match="names no style"):
        sweep.main(["--recipes", "tri-cos900,out-cos1500", "--concepts", "star"])
    with pytest.raises(SystemExit, match="one-concept recipes"):
        sweep.main(["--recipes", "five-const1500", "--concepts", "star"])
    with pytest.raises(SystemExit, match="unknown concept"):
        sweep.main(["--recipes", "tri-cos900", "--concepts", "hexagon"])


def test_sweep_one_replacement_recipes_refuse_their_own_replacement():
    """``tri-cos900-to-circle`` maps each erased shape to the circle: it runs on any other shape and refuses the circle
    (which could not become itself); every generated command is one ``train_svare.py`` accepts."""
    sweep = _script("toy_erasure_sweep")
    jobs = sweep.main(["--recipes", "tri-cos900-to-circle", "--concepts", "star,diamond", "--seeds", "1"])
    assert [j["name"] for j in jobs] == ["tri-cos900-to-circle-star-s1", "tri-cos900-to-circle-diamond-s1"]
    assert all(_training(j["cmds"][0]).replacement == ["circle"] for j in jobs)
    args = _training(jobs[0]["cmds"][0])
    assert replacements_for("star", args.concept, args.replacement) == ["circle"]
    with pytest.raises(SystemExit, match="cannot erase 'circle'"):
        sweep.main(["--recipes", "tri-cos900-to-circle", "--concepts", "circle"])


def test_every_sweep_recipe_is_a_valid_training_command():
    """Each recipe's arguments parse with examples/train_svare.py, and its replacements resolve for its concepts."""
    sweep, train = _script("toy_erasure_sweep"), load_script("examples/train_svare.py")
    for name, (train_args, targets, _) in sweep.RECIPES.items():
        args = train.parse_args(shlex.split(train_args) + ["--output_dir", "unused"])
        assert args.concept == targets, name
        for concept in targets:
            replacements_for(concept, args.concept, args.replacement)  # raises ValueError when inconsistent


def test_heldout_sweep_jobs_train_then_judge_each_phrasing_set(capsys):
    sweep = _script("heldout_erasure_sweep")
    sweep.main(["jobs", "--seeds", "3-4", "--concepts", "red,star", "--base_cache", "outputs/base"])
    jobs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [j["name"] for j in jobs] == ["red-s3", "star-s3", "red-s4", "star-s4"]
    train, *evaluations = jobs[0]["cmds"]
    args = _training(train)
    assert args.concept == ["red"] and args.seed == 3 and args.recipe == "verified"
    assert [shlex.split(c)[shlex.split(c).index("--phrasing_set") + 1] for c in evaluations] == ["unseen"]
    assert all("--base_cache outputs/base" in c and "eval_" in c for c in evaluations)


def test_base_reads_are_computed_once_then_read_from_the_cache(tmp_path):
    sweep = _script("heldout_erasure_sweep")
    calls = []

    def compute():
        calls.append(1)
        return [[True, False], [False, False]]

    settings = {"phrasing_set": "fresh", "images_per_prompt": 2, "seed": 0, "progress": False, "top_k": 2}
    first = sweep._cached_base(str(tmp_path), settings, compute)
    again = sweep._cached_base(str(tmp_path), {**settings, "progress": True}, compute)  # progress is no setting
    other = sweep._cached_base(str(tmp_path), {**settings, "seed": 1}, compute)
    assert first == again == other == [[True, False], [False, False]] and len(calls) == 2
    assert len(list(tmp_path.glob("base-*.json"))) == 2 and not list(tmp_path.glob("*.tmp"))


def test_heldout_sweep_jobs_for_a_baseline_method(capsys):
    sweep = _script("heldout_erasure_sweep")
    sweep.main(["jobs", "--seeds", "3", "--concepts", "blue", "--recipe", "svare", "--method", "esd-x",
                "--tag=-esd-x", "--sets", "fresh"])
    (job,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    args = _training(job["cmds"][0])
    assert job["name"] == "blue-esd-x-s3" and args.method == "esd-x" and args.recipe == "svare"
    assert len(job["cmds"]) == 2


def test_heldout_sweep_appends_train_args_to_every_training_command(capsys):
    sweep = _script("heldout_erasure_sweep")
    sweep.main(["jobs", "--seeds", "3", "--ten", "--concepts", "blue", "--train_args=--validation_steps 250"])
    jobs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [j["name"] for j in jobs] == ["ten-s3", "blue-s3"]
    assert all(_training(j["cmds"][0]).validation_steps == 250 for j in jobs)


def test_heldout_sweep_accepts_every_phrasing_set_and_refuses_unknown_ones(capsys):
    sweep = _script("heldout_erasure_sweep")
    sweep.main(["jobs", "--seeds", "3", "--concepts", "blue", "--sets", "unseen,fresh"])
    (job,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [shlex.split(c)[shlex.split(c).index("--phrasing_set") + 1] for c in job["cmds"][1:]] == ["unseen", "fresh"]
    with pytest.raises(SystemExit, match="unknown phrasing set"):
        sweep.main(["jobs", "--seeds", "3", "--concepts", "blue", "--sets", "unseen,test"])
    with pytest.raises(SystemExit):  # argparse: not one of PHRASING_SETS
        sweep.main(["base", "--phrasing_set", "test", "--output_json", "x.json"])
    assert "invalid choice" in capsys.readouterr().err


def test_heldout_table_counts_what_the_loop_said_against_what_holds(tmp_path, capsys):
    """Each run's report carries the loop's verdict (``training.verified.target_reached``); the table shows it per
    seed and counts how many "reached" hold on the evaluated set and how many "NOT reached" meet the bar anyway."""
    sweep = _script("heldout_erasure_sweep")

    def report(job, acc_e, drop, reached):
        folder = tmp_path / job
        folder.mkdir()
        verified = None if reached is None else {"target_reached": reached}
        (folder / "eval_unseen.json").write_text(json.dumps({
            "erased": ["red"], "per_concept": {"red": acc_e}, "acc_e": acc_e, "acc_i_drop": drop, "base_acc_e": 1.0,
            "training": {"steps": 300, "verified": verified}}))

    report("red-s3", 0.0, 0.001, True)      # said reached, holds
    report("red-s4", 0.08, 0.001, True)     # said reached, does not hold
    report("red-s5", 0.02, 0.001, False)    # said NOT reached, meets the bar anyway
    report("blue-s3", 0.01, 0.03, False)    # said NOT reached, too much damage
    report("blue-s4", 0.0, 0.0, None)       # no judge: no verdict
    text = sweep.main(["table", str(tmp_path), "--report", "eval_unseen.json"])
    assert "| red | 3 |" in text and "| reached, reached, not |" in text and "| not, - |" in text
    assert ("The loop's verdicts: 2 of 4 runs said \"Target reached\", 1 of them hold here; of the 2 that said "
            "\"NOT reached\", 1 meet the bar here anyway.") in text
    assert "Worst concept (acc_e, worst seed): red 0.080" in text and "met on all seeds: 0 of 2 concepts." in text


def test_heldout_table_summarises_each_recipe_tag_on_its_own(tmp_path, capsys):
    """Runs tagged after the concept (``red-cand-s3``) get their own summary beside the untagged ones."""
    sweep = _script("heldout_erasure_sweep")
    for job, acc_e in [("red-s3", 0.08), ("red-cand-s3", 0.0), ("blue-cand-s3", 0.03)]:
        folder = tmp_path / job
        folder.mkdir()
        (folder / "eval_unseen.json").write_text(json.dumps({
            "erased": [job.split("-")[0]], "per_concept": {job.split("-")[0]: acc_e}, "acc_e": acc_e,
            "acc_i_drop": 0.0, "base_acc_e": 1.0, "training": {"steps": 300, "verified": {"target_reached": True}}}))
    text = sweep.main(["table", str(tmp_path), "--report", "eval_unseen.json"])
    assert "Worst concept (acc_e, worst seed): red 0.080" in text and "met on all seeds: 0 of 1 concepts." in text
    assert "Worst concept (cand) (acc_e, worst seed): blue-cand 0.030" in text
    assert "The loop's verdicts (cand): 2 of 2 runs said \"Target reached\", 2 of them hold here" in text
