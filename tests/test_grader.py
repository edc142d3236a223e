"""grader.py: hand-labelled hard cases, generated rewrite/perturbation sets, the real math12k pairs, safety against
payloads, pathological inputs, the worker pool's time limit, and issue 16: the frozen cases, equivalence and extraction
per family, tiny values, huge function arguments, long responses, non-string inputs. CPU only, about half a minute."""
import builtins
import collections
import json
import os
import re
import subprocess
import sys
import time

import pytest

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
    from benchmarks.grader import grader_sets
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
    """Payloads in every extraction path leave no file, score 0, and Python's code runners are never reached.
    The target is relative to an empty cwd: no digit of the machine's temp path (pytest-0) is in a response."""
    monkeypatch.chdir(tmp_path)  # workers start in the parent's cwd: a payload run anywhere would write here
    target = "pwned"
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
    assert calls == [] and os.listdir(tmp_path) == []
    with GraderPool(workers=1) as pool:
        assert [r for r, _ in pool.rewards(responses, ["0"] * len(responses), "qwen_math")] == [0.0] * len(responses)
        assert not any(pool.grades(responses, ["0"] * len(responses)))
    assert os.listdir(tmp_path) == []
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


# A grader bug (an exception) scores 0 and is counted; a worker that dies on a response (out of memory?) is
# replaced, and that response scores 0.
def faulty_grader(task, template, response, gold):
    if response.startswith("RAISE"):
        raise ValueError("a grader bug")
    if response.startswith("DIE"):
        os._exit(1)
    return grader.grade_item(task, template, response, gold)


def test_pool_counts_errors_and_replaces_a_worker_that_dies_later():
    responses, golds = [f"so \\boxed{{{k}}}" for k in range(16)], [str(k) for k in range(16)]
    for k in (2, 9, 14):
        responses[k] = f"RAISE \\boxed{{{k}}}"
    with GraderPool(workers=2, chunk=4, fn=faulty_grader) as pool:
        assert pool.grades(responses, golds) == [k not in (2, 9, 14) for k in range(16)]
        assert pool.errors == 3 and pool.timeouts == 0
        responses[5] = "DIE \\boxed{5}"  # second chunk of four: response 4 is graded again, then 6 and 7
        assert pool.grades(responses, golds) == [k not in (2, 5, 9, 14) for k in range(16)]
        assert pool.errors == 6 and pool.timeouts == 1
        assert sum(proc.is_alive() for proc, _, _ in pool._slots) == 2


def test_pool_started_from_stdin_raises_one_clear_error(tmp_path):
    """Workers re-import __main__, which a script fed on stdin lacks: one clear error, not all-False grades."""
    script = (f"import sys; sys.path.insert(0, {os.path.dirname(HERE)!r})\nfrom grader import GraderPool\n"
              "with GraderPool(workers=2) as pool:\n    print(pool.grades(['1'] * 8, ['1'] * 8))\n")
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert run.returncode != 0 and run.stdout == "" and time.perf_counter() - t0 < 60
    last = run.stderr.strip().splitlines()[-1]  # the exit code is the dying worker's (1, or -15 if killed)
    assert re.fullmatch(r"RuntimeError: grader workers died at start-up 3 times in a row \(exit -?\d+\): likely "
                        r"__main__ re-imported: run from a file, not stdin or a notebook", last), last


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


FROZEN = os.path.join(HERE, "grader_frozen.jsonl")


def test_frozen_cases_of_issue_16():
    """115 cases written before the issue-16 changes (score then: 56/115, 10 FP, 49 FN); every one must hold now."""
    cases = [json.loads(line) for line in open(FROZEN)]
    assert len(cases) >= 60 and len({c["family"] for c in cases}) >= 12
    wrong = [(c["family"], c["gold"][:40], c["response"][-60:]) for c in cases
             if grade(c["response"], c["gold"]) != c["label"]]
    assert wrong == []


# (pred, gold, equal) per family: answers as is_equiv sees them (grade() adds the extraction on top).
FAMILIES = {
    "inequality": [("x\\geqslant 3", "[3, \\infty)", True), ("3 < x", "x > 3", True),
                   ("-2x \\le -6", "x \\ge 3", True),
                   ("x \\ne 4", "(-\\infty, 4) \\cup (4, \\infty)", True), ("\\mathbb{R}", "(-\\infty, \\infty)", True),
                   ("0 \\le x < 1", "[0, 1)", True),
                   ("x < -1 \\text{ or } x > 1", "(-\\infty,-1)\\cup(1,\\infty)", True),
                   ("x > 3", "x \\ge 3", False), ("0 < x \\le 1", "[0, 1]", False), ("x < 3", "(3, \\infty)", False)],
    "thousands": [("12\\, 345", "12345", True), ("1,\\!234,\\!567", "1234567", True), ("7{,} 000", "7000", True),
                  ("3,\\ 500", "3500", True), ("1\\,500", "1050", False), ("1, 000", "1000", False)],
    "identity": [("5^{3^{20}} - 5^{3^{20}}", "0", True), ("1^{7^{7^{7}}}", "1", True), ("(-1)^{10^{30}}", "1", True),
                 ("8^{2^{20}}", "2^{3 \\cdot 2^{20}}", True), ("3^{3000}", str(3 ** 3000), True),
                 ("3^{3000}", str(3 ** 3000 + 1), False), ("2^{2^{30}}", "2^{2^{30}} + 1", False)],
    "labelled": [("p = 3, q = -2", "(3, -2)", True), ("(3, -2)", "p = 3, q = -2", True),
                 ("p = -2, q = 3", "(3, -2)", False), ("x=0, y=1 \\text{ or } x=1, y=0", "(1, 0), (0, 1)", True),
                 ("x=0, y=0 \\text{ or } x=1, y=0", "(1,0),(0,1)", False),
                 ("PQ = 13", "13", True), ("\\angle B = 45^\\circ", "45", True), ("PQ = 12", "13", False)],
    "sets_matrices": [("\\{5, -5\\}", "-5, 5", True), ("0, \\pm 2", "\\{-2, 0, 2\\}", True),
                      ("\\{1, 2\\}", "1, 2, 3", False),
                      ("\\left[\\begin{array}{cc} 0 & 1 \\\\ 1 & 0 \\end{array}\\right]",
                       "\\begin{pmatrix} 0 & 1 \\\\ 1 & 0 \\end{pmatrix}", True),
                      ("\\left[\\begin{array}{cc} 1 & 0 \\\\ 0 & 1 \\end{array}\\right]",
                       "\\begin{pmatrix} 0 & 1 \\\\ 1 & 0 \\end{pmatrix}", False)],
    "products": [("cab", "abc", True), ("q p r + 1", "1 + pqr", True), ("2mn", "2nm + 1", False)],
    "repeating": [("0.\\overline{27}", "\\frac{3}{11}", True), ("0.58\\overline{3}", "\\frac{7}{12}", True),
                  ("0.(142857)", "\\frac{1}{7}", True), ("0.\\overline{3}", "0.3", False),
                  ("0.27", "\\frac{3}{11}", False)],
}


def test_equivalence_per_family():
    wrong = [(fam, p, g) for fam, cases in FAMILIES.items() for p, g, want in cases if is_equiv(p, g) != want]
    assert wrong == []


def test_lenient_extraction_per_family():
    """Closing sentences (no box), digits inside words, responses cut off or inside an unclosed <think>."""
    assert lenient_answer("Final Answer: the value of $k$ is 9. I hope it is correct.") == "9"
    assert lenient_answer("Thus the answer is $\\frac{2}{3}$.<|im_end|>\n<|im_start|>user\nAnd 5?") == "\\frac{2}{3}"
    assert lenient_answer("**Final Answer:** 42") == "42"
    assert lenient_answer("Therefore, there are 12 ways to seat 3 people.") == "12"
    assert lenient_answer("Therefore, the area is $\\frac{9}{2}$ square units.") == "\\frac{9}{2}"
    assert lenient_answer("The answer is either 10 or 12.") == "either 10 or 12"  # a hedge stays whole (and fails)
    assert grade("So the final answer is: the total equals 300 dollars.\n\n(Note: tax excluded.)", "300")
    assert grade("Final Answer: The final answer is $6$. I hope it is correct.", "6")
    assert not grade("Final Answer: the value of $n$ is 5. I hope it is correct.", "6")
    assert lenient_answer("I checked it with the isotope C14.") is None  # a digit in a word is no number
    assert lenient_answer("The product formed is CO2.") is None
    assert lenient_answer("First, 6 \\times 7 = 42. Then we add the") is None  # cut off mid-sentence
    assert lenient_answer("<think>\nSo 6 \\times 7 = 42") is None  # an unclosed <think>
    assert lenient_answer("<think>6 \\times 7 = 42</think>\nThe product is 42.") == "42"
    assert not grade("We get 4 + 5 = 9, and next", "9") and grade("We get 4 + 5 = 9.", "9")
    assert not grade("The answer is open('/home/user-0/x')", "0")  # a number inside a path is not stated
    for text in ("So it is x_0.", "It is user-0.", "We use v2.", "It is in /tmp/pytest-0/ now.", "It is n/2."):
        assert lenient_answer(text) is None, text
    assert lenient_answer("So it is -3.") == "-3" and lenient_answer("Thus x = 3/4.") == "3/4"


def test_tiny_exact_values_are_not_zero():
    for pred in ("10^{-999999}", "2^{-200000}", "\\frac{1}{10^{999999}}", "3^{-500000}", "\\sqrt{2}^{-999999}"):
        t0 = time.perf_counter()
        assert reward(f"\\boxed{{{pred}}}", "0", "qwen_math") == 0.0, pred
        assert time.perf_counter() - t0 < 2.0
    assert reward("\\boxed{10^{-50} - 10^{-50}}", "0", "qwen_math") == 1.0
    assert reward("\\boxed{\\sin(\\pi)}", "0", "qwen_math") == 1.0  # rounding residues still count as 0


def test_huge_function_arguments_return_fast():
    for pred in ("\\sin(10^{999999})", "\\exp(10^{999999})", "\\cos(2^{10^{9}})", "\\exp(\\exp(\\exp(\\exp(10))))",
                 "\\tan(10^{900})", "e^{10^{999999}}"):
        t0 = time.perf_counter()
        assert grade(f"\\boxed{{{pred}}}", "1") is False and reward(f"\\boxed{{{pred}}}", pred, "qwen_math") == 1.0
        assert time.perf_counter() - t0 < 2.0, pred


def test_long_responses_are_bounded():
    """Anything up to 1 MB is handled in well under a second; longer responses are cut to their last 1 MB."""
    for resp, gold, want in [("x " * 5_000_000, "5", False), ("y " * 5_000_000 + "\\boxed{5}", "5", True),
                             ("{" * 10_000_000, "1", False), ("\\boxed{" + "{" * 2_000_000, "1", False),
                             ("7 " * 500_000 + ".", "7", True), ("$" * 10_000_000, "1", False)]:
        t0 = time.perf_counter()
        assert grade(resp, gold) is want and reward(resp, gold, "qwen_math") == float(want and "boxed" in resp)
        assert time.perf_counter() - t0 < 2.0, resp[:20]
    assert grade("\\boxed{5}" + " x" * 400_000, "5")  # the box lies within the last 1 MB
    assert not grade("\\boxed{5}" + " x" * 600_000, "5")  # cut: 1.2 MB, the box is in the first 0.2 MB


def test_non_string_inputs_are_converted_or_refused():
    assert grade("\\boxed{12}", 12) and reward("\\boxed{0.5}", 0.5, "qwen_math") == 1.0 and grade(7, "7")
    assert reward("\\boxed{3}", [3, "three"], "qwen_math") == 1.0
    for response, gold in [("\\boxed{1}", None), (None, "1"), ("\\boxed{1}", True), ("\\boxed{1}", {"a": 1}),
                           ("\\boxed{1}", float("nan")), ("\\boxed{1}", [])]:
        with pytest.raises((TypeError, ValueError)):
            grade(response, gold)
    with GraderPool(workers=1) as pool:  # refused in the parent, never a silent 0 from a worker
        with pytest.raises(TypeError):
            pool.grades(["\\boxed{1}", "\\boxed{2}"], ["1", None])
        with pytest.raises(ValueError):
            pool.rewards(["\\boxed{1}"], ["1", "2"], "qwen_math")
        assert pool.grades(["\\boxed{2}"], [2]) == [True]
