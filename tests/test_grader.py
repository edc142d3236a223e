"""grader.py: hand-labelled hard cases, generated rewrite/perturbation sets, the real math12k pairs, safety against
payloads, pathological inputs, and the worker pool's time limit. CPU only, about half a minute."""
import builtins
import collections
import json
import os
import re
import time

import grader
from grader import GraderPool, extract_answer, grade, is_equiv, lenient_answer, reward

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = os.path.join(HERE, "grader_cases.jsonl")


def judge(case: dict) -> bool:
    if case["template"] == "grade":
        return grade(case["response"], case["gold"])
    return reward(case["response"], case["gold"], case["template"]) == 1.0


def test_hand_labelled_cases():
    cases = [json.loads(line) for line in open(CASES)]
    labels = collections.Counter(c["label"] for c in cases)
    rules = collections.Counter(c["rule"] for c in cases)
    assert len(cases) >= 200 and labels[True] >= 60 and labels[False] >= 60 and len(rules) >= 30
    wrong = [(c["rule"], c["gold"], c["response"][-80:], c["label"]) for c in cases if judge(c) != c["label"]]
    assert wrong == []


def test_generated_sets(shared_data):
    from bench import grader_sets
    path = os.path.join(shared_data, "train", "math12k.jsonl")
    sets = grader_sets(path, per_kind=40)
    assert sets == grader_sets(path, per_kind=40)  # deterministic
    kinds = {name: {it["kind"] for it in items} for name, items in sets.items()}
    assert {"dfrac", "a/b", "exact decimal", "units / \\text / \\$", "x = ", "reordered set", "zero-padded",
            "thousands sep"} <= kinds["correct"]
    assert {"off by one", "wrong sign", "decimal approx", "swapped tuple"} <= kinds["wrong"]
    for items in sets.values():
        assert all(it["gold"] in it["response"] or it["pred"] in it["response"] for it in items)
        wrong = [(it["kind"], it["gold"], it["pred"]) for it in items
                 if (reward(it["response"], it["gold"], "qwen_math") == 1.0) != it["label"]]
        assert wrong == []


def test_math12k_pairs(shared_data):
    """Every reference solution earns its own answer; paired with the next row's answer it almost never does."""
    rows = [json.loads(line) for line in open(os.path.join(shared_data, "train", "math12k.jsonl"))]
    misses = [r["answer"] for r in rows if reward(r["solution"], r["answer"], "qwen_math") != 1.0]
    assert all(m.strip() == "" for m in misses) and len(misses) <= 2  # two rows have an empty gold box
    nxt = [(r["solution"], rows[(k + 1) % len(rows)]["answer"]) for k, r in enumerate(rows)]
    nxt = [(s, a) for (s, a), r in zip(nxt, rows) if a.replace(" ", "") != r["answer"].replace(" ", "")]
    hits = sum(reward(s, a, "qwen_math") for s, a in nxt)
    assert len(nxt) > 10_000 and hits < 0.002 * len(nxt)  # the few hits are equal values (120 vs 120^\circ)


def test_extraction_per_template():
    assert extract_answer("so $\\boxed{\\frac{1}{2}}$ and", "qwen_math") == "\\frac{1}{2}"
    assert extract_answer("\\boxed{1} then \\boxed{2}", "no") == "2"
    assert extract_answer("no box here", "qwen_math") is None
    assert extract_answer("\\boxed{unclosed", "qwen_math") is None
    assert extract_answer("\\boxed{}", "qwen_math") == ""
    assert extract_answer("x </think> <answer> 7 </answer>", "r1") == "7"
    assert extract_answer("x </think><answer> 7 </answer>", "r1") is None
    assert extract_answer("x </think> <answer> \\boxed{7 </answer>", "r1") == ""  # found, unusable: scores 0
    assert extract_answer("x <answer>\\boxed{7}</answer> y", "open-reasoner-zero") == "7"
    assert extract_answer("\\boxed{7}", "open-reasoner-zero") is None
    assert lenient_answer("The answer is $\\frac{3}{4}$. Done.") == "\\frac{3}{4}"
    assert lenient_answer("blah 3 then 17 apples") == "17"
    assert lenient_answer("nothing numeric") is None
    assert "nreduced fractions count as correct" in grader.__doc__  # the deliberate choice is documented


def test_list_gold_and_equivalences():
    assert reward("\\boxed{5.0}", ["5", "five"], "qwen_math") == 1.0
    assert reward("\\boxed{6}", ["5", "five"], "qwen_math") == 0.0
    assert is_equiv("\\frac{2}{4}", "\\frac12") and not is_equiv("1.414", "\\sqrt{2}")
    assert is_equiv("(-4, 3)", "(-4,3)") and not is_equiv("(3, -4)", "(-4,3)")


PAYLOADS = [
    "\\boxed{__import__('os').system('touch {f}')}",
    "\\boxed{__import__(\"os\").system(\"touch {f}\")}",
    "<answer>open('{f}', 'w').write('x')</answer>",
    "\\boxed{().__class__.__base__.__subclasses__()}",
    "The answer is exec(\"open('{f}','w')\")",
    "\\boxed{\\text{__import__('os').system('touch {f}')}}",
    "\\boxed{(lambda: __import__('os').system('touch {f}'))()}",
    "\\boxed{x = __import__('subprocess').call(['touch', '{f}'])}",
    "</think> <answer> \\boxed{__import__('os').system('touch {f}')} </answer>",
]


def test_payloads_are_never_executed(tmp_path, monkeypatch):
    """Payloads in every extraction path leave no file, score 0, and Python's code runners are never reached."""
    target = str(tmp_path / "pwned")
    calls = []
    for name in ("ev" + "al", "ex" + "ec", "compile"):
        real = getattr(builtins, name)
        monkeypatch.setattr(builtins, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    responses = [p.replace("{f}", target) for p in PAYLOADS]
    for resp in responses:
        for gold in ("0", target, "__import__('os')"):
            for template in ("qwen_math", "r1", "open-reasoner-zero"):
                assert reward(resp, gold, template) in (0.0, 1.0)
            grade(resp, gold)
    assert calls == [] and not os.path.exists(target)
    with GraderPool(workers=1) as pool:
        assert [r for r, _ in pool.rewards(responses, ["0"] * len(responses), "qwen_math")] == [0.0] * len(responses)
        assert not any(pool.grades(responses, ["0"] * len(responses)))
    assert not os.path.exists(target)
    source = open(grader.__file__).read()
    for token in ("ev" + "al(", "ex" + "ec(", "symp" + "ify(", "parse" + "_expr("):
        assert token not in source


PATHOLOGICAL = [
    ("\\boxed{9^{9^{9^{9}}}}", "1"),
    ("\\boxed{10^{10^{10^{10}}}}", "10^{10^{10^{10}}}"),
    ("\\boxed{2^{2^{2^{2^{2^{2}}}}}}", "2"),
    ("\\boxed{(9!)!}", "1"),
    ("\\boxed{\\binom{10^{9}}{500000000}}", "1"),
    ("\\boxed{" + "7" * 5000 + "}", "7" * 5000),
    ("\\boxed{" + "7" * 5000 + "}", "7" * 4999 + "8"),
    ("\\boxed{" + "7" * 5000 + "}", "\\frac{" + "7" * 5000 + "}{1}"),
    ("\\boxed{" + "{" * 5000 + "1" + "}" * 4999, "1"),  # unbalanced
    ("\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}", "1"),
    ("\\boxed{" + "\\frac{" * 2000 + "1}{2}" * 2000 + "}", "1"),
    ("\\boxed{\\sqrt[100]{2}^{999999}}", "2"),
    ("\\boxed{\\frac{1}{0}}", "\\infty"),
    ("\\boxed{0^{-1}}", "1"),
    ("\\boxed{x^{1000000}}", "x^{1000000}+1"),
    ("\\boxed{" + "x+" * 3000 + "x}", "3001x"),
    ("word " * 20000 + "\\boxed{5}", "5"),  # 100 KB
    ("{" * 100_000, "5"),
    ("1 " * 50_000, "1"),
    ("The answer is " * 7000 + "5", "5"),
    ("</answer>" + "<answer>" * 12_000, "1"),  # a non-greedy <answer>(.*?)</answer> regex takes ~45 s on this
    ("x </think> <answer>" * 5000 + "</answer>", "1"),
]


def test_pathological_inputs_return_fast():
    for resp, gold in PATHOLOGICAL:
        t0 = time.perf_counter()
        for template in ("qwen_math", "r1", "open-reasoner-zero"):
            assert reward(resp, gold, template) in (0.0, 1.0)
        assert grade(resp, gold) in (True, False)
        assert time.perf_counter() - t0 < 1.0, resp[:60]
    assert reward(PATHOLOGICAL[5][0], PATHOLOGICAL[5][1], "qwen_math") == 1.0
    assert reward(PATHOLOGICAL[6][0], PATHOLOGICAL[6][1], "qwen_math") == 0.0
    assert reward(PATHOLOGICAL[16][0], "5", "qwen_math") == 1.0
    with GraderPool(workers=2, timeout=1.0) as pool:
        out = pool.rewards([r for r, _ in PATHOLOGICAL], [g for _, g in PATHOLOGICAL], "qwen_math")
        assert pool.timeouts == 0 and out[16] == (1.0, True)


# Worker-function injection (documented in GraderPool): this function runs in the workers instead of
# grader.grade_item. For responses starting with "SLOW" it applies the regex (a+)+$ to a string that does not
# match - catastrophic backtracking inside the C regex engine, ~2**40 steps, which no Python-level signal can
# interrupt. It really hangs; only the pool's kill can stop it.
def naive_regex_grader(task, template, response, gold):
    if response.startswith("SLOW"):
        re.match(r"(a+)+$", "a" * 40 + "b")
    return grader.grade_item(task, template, response, gold)


def test_pool_kills_hung_worker_keeps_size_and_order():
    responses = [f"so \\boxed{{{k}}}" for k in range(12)]
    responses[3] = responses[9] = "SLOW \\boxed{3}"
    golds = [str(k) for k in range(12)]
    golds[3] = "3"
    with GraderPool(workers=2, timeout=0.5, chunk=4, fn=naive_regex_grader) as pool:
        t0 = time.perf_counter()
        out = pool.rewards(responses, golds, "qwen_math")
        assert time.perf_counter() - t0 < 20
        assert pool.timeouts == 2 and sum(proc.is_alive() for proc, _, _ in pool._slots) == 2
        expect = [(1.0, True)] * 12
        expect[3] = expect[9] = (0.0, False)
        assert out == expect
        assert pool.grades(["\\boxed{1}", "SLOW", "x = 7"], ["1", "1", "7"]) == [True, False, True]
        assert pool.timeouts == 3 and sum(proc.is_alive() for proc, _, _ in pool._slots) == 2


def test_pool_matches_in_process_and_preserves_order():
    cases = [json.loads(line) for line in open(CASES)]
    responses, golds = [c["response"] for c in cases], [c["gold"] for c in cases]
    want_r = [(reward(r, g, "qwen_math"), extract_answer(r, "qwen_math") is not None) for r, g in zip(responses, golds)]
    want_g = [grade(r, g) for r, g in zip(responses, golds)]
    for workers in (0, 2):
        with GraderPool(workers=workers, chunk=7) as pool:
            assert pool.rewards(responses, golds, "qwen_math") == want_r
            assert pool.grades(responses, golds) == want_g
            assert pool.rewards([], [], "r1") == [] and pool.timeouts == 0
    assert sum(r for r, _ in want_r) > 100 and sum(want_g) > 100
