"""The tokenizer of the tiny checkpoints: byte-level BPE trained on a small built-in corpus,
with ChatML special tokens and chat template. Written by hand with `tokenizers`, so that
`transformers` stays an independent reference."""

from __future__ import annotations

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")
TOKENIZER_VOCAB_SIZE = 384
MIN_TOKENIZER_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
# Qwen2's pre-tokenization pattern. It must stay exactly this: for model_type qwen2,
# transformers 5 rebuilds the tokenizer with this pattern whatever tokenizer.json says.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML; with tools, Hermes/Qwen style: the tools' signatures in the system turn, the model's
# calls as <tool_call>{"name", "arguments"}</tool_call>, tool results as <tool_response> in a
# user turn (what `--tool-call-parser hermes` reads back).
CHAT_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ 'You can call these functions. Their signatures are in <tools></tools>:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    '{{ \'\\n</tools>\\nTo call one, write <tool_call>\\n{"name": <function name>, '
    '"arguments": <arguments as a JSON object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and tools and loop.first %}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + "
    "'\\n</tool_response><|im_end|>\\n' }}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant\\n' + message['content'] }}"
    "{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' + "
    "(call['function']['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """\
The river ran past the old mill and under the stone bridge, where the children of the village
stood every morning to watch the water. In spring it was brown and loud; in summer it was clear
and slow, and you could see the small fish turning in the light. The miller said that the river
had been there before the village and would be there after it, and nobody argued with him.

A language model reads a prompt one token at a time and predicts the next token. The prefill
phase reads the whole prompt at once and is limited by arithmetic; the decode phase produces one
token per step and is limited by memory bandwidth. Serving systems that split the two phases onto
different workers can size each pool for its own bottleneck, and move the attention keys and
values from the prefill worker to the decode worker over the network.

She opened the window, and the smell of rain came into the room. On the table there were three
letters, a cup of cold tea, and a map of the northern coast with a red line drawn along the
cliffs. She had walked that line twice already. The third time, she thought, she would walk it
in winter, when the paths were empty and the sea was the colour of slate.

Good tests are small and fast, and each one checks something that would catch a real bug. A test
that cannot fail is not a test. When two implementations must agree token for token, the inputs
should be chosen so that the answer is not decided by rounding: if the two best scores are almost
equal, a different order of additions can change which one wins.

The market opened at seven. Farmers brought apples, pears, onions, cheese and bread, and the
baker sold out of rolls before eight. By noon the square was full of people talking about the
weather, the price of wheat, the new school, and the music that would be played in the evening.
"""


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB_SIZE, *, nfc: bool = False) -> Tokenizer:
    """Byte-level BPE with exactly `vocab_size` tokens: 256 byte symbols, merges learned from a
    built-in corpus, then the special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` as the
    last ids. Training is deterministic (same merges on every run).

    Text is split with Qwen2's pattern, then mapped to byte symbols. Without `nfc` any UTF-8
    text round-trips; with it, input is NFC-normalised first, which qwen2 checkpoints need
    because transformers 5 forces exactly that pipeline on them (Qwen2Tokenizer).
    """
    if vocab_size < MIN_TOKENIZER_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_TOKENIZER_VOCAB_SIZE}, got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS], trainer=trainer)
    specials = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    tokenizer.add_special_tokens(specials)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the built-in corpus supports at most {tokenizer.get_vocab_size()} tokens, "
            f"asked for {vocab_size}"
        )
    return tokenizer


def tokenizer_config(vocab_size: int, max_length: int) -> dict:
    """tokenizer_config.json: a plain fast tokenizer over tokenizer.json, ChatML template."""
    added = {}
    for offset, token in enumerate(SPECIAL_TOKENS):
        token_id = vocab_size - len(SPECIAL_TOKENS) + offset
        added[str(token_id)] = {
            "content": token,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
            "special": True,
        }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    }
