"""templates.py: the exact prompt strings of the paper's code, and what each template implies."""
import pytest

from templates import TEMPLATES, get_template, render


def test_rendered_strings_are_exact():
    q = "What is $\\frac{1}{2} + 1$?"
    assert render("qwen_math", q) == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\nWhat is $\\frac{1}{2} + 1$?<|im_end|>\n<|im_start|>assistant\n")
    assert render("r1", q) == (
        "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The "
        "Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. "
        "The reasoning process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> "
        "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.\n"
        "User: What is $\\frac{1}{2} + 1$?\nAssistant: <think>")
    assert render("no", q) == q
    assert render("prime-zero", q) == (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
        "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
        "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
        "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. User: "
        "What is $\\frac{1}{2} + 1$?\n\nPresent the answer in LaTex format: \\boxed{Your answer}. Assistant:")
    assert render("open-reasoner-zero", q) == (
        "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The "
        "Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. "
        "The reasoning process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> "
        "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. User: "
        "You must put your answer inside <answer> </answer> tags, i.e., <answer> answer here </answer>. And your "
        "final answer will be extracted automatically by the \\boxed{} tag.\nThis is the problem:\n"
        "What is $\\frac{1}{2} + 1$?\nAssistant: <think>")


def test_extraction_and_stops():
    assert {n: t.answer for n, t in TEMPLATES.items()} == {
        "qwen_math": "boxed", "r1": "r1", "no": "boxed", "prime-zero": "boxed", "open-reasoner-zero": "answer_tag",
        "instruct": "boxed"}
    assert get_template("r1").stop == ("</answer>",) and get_template("qwen_math").stop == ()
    assert [n for n, t in TEMPLATES.items() if t.train] == ["qwen_math", "r1", "no"]
    with pytest.raises(ValueError, match="unknown template"):
        get_template("r2")


def test_instruct_uses_the_tokenizer_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="chat template"):
        render("instruct", "1+1?", tok)  # the demo tokenizer has none: a clear error, not a silent fallback
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "<|im_start|>assistant\n")
    assert render("instruct", "1+1?", tok) == (
        "<|im_start|>user\n1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant")  # jinja drops the template's final newline
