"""Prompt templates, and what each one implies for grading and for where generation stops.

The paper's axis is template x question set x base model. A template fixes three things:
  prompt  - the exact string the question is dropped into (`{q}`),
  answer  - how the reward is extracted from a response (grader.py reads this field):
              "boxed"      the last \\boxed{...} of the response,
              "r1"         Oat's strict r1 format: '</think> <answer>' ... '</answer>', a \\boxed{} inside unwrapped,
              "answer_tag" <answer>...</answer> anywhere, a \\boxed{} inside unwrapped (looser than r1),
  stop    - stop strings, kept in the output (vLLM's include_stop_str_in_output). Every template also
            stops at the model's EOS tokens; rollout.py adds those.
The strings are copied character for character from the paper's code (see shared/design.md); tests pin them.
"""
from dataclasses import dataclass

QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Template:
    name: str
    prompt: str            # format string with one field, {q}; unused when chat=True
    answer: str            # reward extraction: "boxed" | "r1" | "answer_tag"
    stop: tuple = ()       # stop strings, kept in the output
    chat: bool = False     # rendered with the tokenizer's own chat template (instruct models)
    train: bool = True     # False: evaluation-only baseline template


# The r1 and open-reasoner-zero prompts share their first three sentences.
_R1_INTRO = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with the "
    "answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>."
)

TEMPLATES = {t.name: t for t in [
    Template(
        name="qwen_math",
        prompt=("<|im_start|>system\n" + QWEN_MATH_SYSTEM + "<|im_end|>\n"
                "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"),
        answer="boxed"),
    Template(
        name="r1",
        prompt=_R1_INTRO + "\nUser: {q}\nAssistant: <think>",
        answer="r1",
        stop=("</answer>",)),
    Template(name="no", prompt="{q}", answer="boxed"),
    # Baselines: only to score other projects' released models the way the paper did.
    Template(
        name="prime-zero",
        prompt=("A conversation between User and Assistant. The user asks a question, and the Assistant solves "
                "it. The assistant first thinks about the reasoning process in the mind and then provides the "
                "user with the answer. The reasoning process and answer are enclosed within <think> </think> "
                "and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
                "<answer> answer here </answer>. User: {q}\n\nPresent the answer in LaTex format: "
                "\\boxed{Your answer}. Assistant:"),
        answer="boxed", train=False),
    Template(
        name="open-reasoner-zero",
        prompt=(_R1_INTRO + " User: You must put your answer inside <answer> </answer> tags, i.e., "
                "<answer> answer here </answer>. And your final answer will be extracted automatically by the "
                "\\boxed{} tag.\nThis is the problem:\n{q}\nAssistant: <think>"),
        answer="answer_tag", train=False),
    Template(name="instruct", prompt="{q}\n" + QWEN_MATH_SYSTEM, answer="boxed", chat=True, train=False),
]}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def render(name: str, question: str, tokenizer=None) -> str:
    """The prompt text for one question. Only the chat form needs the tokenizer."""
    t = get_template(name)
    if not t.chat:
        # str.replace, not str.format: MATH problems are full of braces.
        return t.prompt.replace("{q}", question)
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"template {name!r} needs a tokenizer with a chat template")
    messages = [{"role": "user", "content": t.prompt.replace("{q}", question)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
