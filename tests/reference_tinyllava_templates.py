"""TinyLLaVA-Factory's template code (tinyllava/data/template/{base,formatter,qwen2_base_template,
pretrain_template}.py), transcribed with lists instead of tensors: the oracle the golden sequences
are checked against. Only what encode(mode='train') and the eval prompt use."""
import copy

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


def string_formatter(slot, content):
    if content is None:
        return slot.split(':')[0] + ":"
    return slot.replace("{{content}}", content, 1)


QWEN2_BASE = dict(image=lambda c: string_formatter("<image>\n{{content}}", c),
                  user=lambda c: string_formatter("USER" + ": " + "{{content}}" + " ", c),
                  assistant=lambda c: string_formatter("ASSISTANT" + ": " + "{{content}}" + "<|endoftext|>", c),
                  system=SYSTEM + " ", separator=[' ASSISTANT: ', '<|endoftext|>'])
PRETRAIN = dict(image=lambda c: "", user=lambda c: "<image>", assistant=lambda c: string_formatter("{{content}}\n", c),
                system="", separator=['', ''])


def get_list_from_message(messages):
    question_list, answer_list = [], []
    first_is_not_question = 0
    for i, message in enumerate(messages):
        if i == 0 and message['from'] != 'human':
            first_is_not_question = 1
            continue
        if i % 2 == first_is_not_question:
            question_list.append(message['value'])
        else:
            answer_list.append(message['value'])
    assert len(question_list) == len(answer_list)
    return question_list, answer_list


def prompt(t, question_list, answer_list):
    msg = ""
    for i, (question, answer) in enumerate(zip(question_list, answer_list)):
        if i == 0:
            msg += t["system"]
        if DEFAULT_IMAGE_TOKEN in question:
            question = question.replace(DEFAULT_IMAGE_TOKEN, '').strip()
            question = t["image"](question).strip()
        msg += t["user"](question)
        msg += t["assistant"](answer)
    return msg


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    def _insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split('<image>')]
    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in _insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def make_labels_qwen2_base(t, input_ids, prompt, tokenizer):
    labels = copy.deepcopy(input_ids)
    sep, eos_token = t["separator"]
    total_len = sum(1 for x in labels if x != tokenizer.pad_token_id)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        total_len += prompt.count(eos_token)
    rounds = prompt.split(eos_token)
    eos_token_length = len(tokenizer.encode(eos_token))
    cur_len = 0
    for rou in rounds:
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer_image_token(rou, tokenizer)) + eos_token_length
        instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 1
        labels[cur_len: cur_len + instruction_len] = [IGNORE_INDEX] * len(labels[cur_len: cur_len + instruction_len])
        cur_len += round_len
    labels[cur_len:] = [IGNORE_INDEX] * len(labels[cur_len:])
    if cur_len < tokenizer.model_max_length:
        if cur_len != total_len:  # "WARNING: tokenization mismatch ... (ignored)"
            labels[:] = [IGNORE_INDEX] * len(labels)
    return labels


def encode(messages, tokenizer, template):
    t = QWEN2_BASE if template == "qwen2_base" else PRETRAIN
    q, a = get_list_from_message(messages)
    p = prompt(t, q, a)
    ids = tokenizer_image_token(p, tokenizer)
    if template == "qwen2_base":
        labels = make_labels_qwen2_base(t, ids, p, tokenizer)
    else:
        labels = copy.deepcopy(ids)
        mask_len = len(tokenizer_image_token("<image>", tokenizer))
        labels[:mask_len] = [IGNORE_INDEX] * mask_len
    return p, ids, labels


def eval_prompt(question, template="qwen2_base"):
    """model_vqa*.py: '<image>\n' + question, answer None, mode='eval'."""
    t = QWEN2_BASE if template == "qwen2_base" else PRETRAIN
    qs = DEFAULT_IMAGE_TOKEN + '\n' + question
    return prompt(t, [qs], [None])
