"""Regenerate the embedded default model's tokenizer (``tokenizer.json`` + ``tokenizer_config.json``).

    python hf_paged/default_model/make_tokenizer.py

A byte-level BPE (every string encodes; nothing is unknown) trained in code on a corpus generated here
from a fixed word list with a seeded RNG, so no download is needed and a rerun writes the same files.
Its 4,096 ids match the embedded model's ``vocab_size``: pad 0, bos 1, eos 2, then the chat role
markers, the 256 byte symbols and the learned merges. The chat template renders
``<s><|user|>\\nHi</s>\\n<|assistant|>\\n``; it holds the BOS itself, so chat prompts are tokenized
without adding special tokens again.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Common English words by role; sentences are drawn from these with a seeded RNG.
NOUNS = """time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government number night
point home water room mother area money story fact month lot right study book eye job word business issue
side kind head house service friend father power hour game line end member law car city community name
president team minute idea kid body information back parent face others level office door health person
art war history party result change morning reason research girl guy moment air teacher force education
foot boy age policy music market sense nation plan college interest death experience effect class control
care field development role effort rate heart drug show leader light voice wife police mind price report
decision son view relationship town road arm difference thing value building action model season society
tax director position player record paper space ground form event official matter center couple site
project activity star table need court oil situation cost industry figure street image phone data picture
practice piece land product doctor wall patient worker news test movie north love support technology step
baby computer type attention film tree source organization hair window evidence population site garden
river mountain ocean island forest bridge engine memory block token request server client model cache
batch queue thread kernel device network signal message answer letter language science nature animal
bird fish horse dog cat flower seed stone glass paper metal fire wind rain snow summer winter spring
autumn morning evening kitchen bread coffee tea milk apple orange sugar salt dinner lunch breakfast""".split()
VERBS = """be have do say go get make know think take see come want look use find give tell work call try ask
need feel become leave put mean keep let begin seem help talk turn start show hear play run move like live
believe hold bring happen write provide sit stand lose pay meet include continue set learn change lead
understand watch follow stop create speak read allow add spend grow open walk win offer remember love
consider appear buy wait serve die send expect build stay fall cut reach kill remain suggest raise pass
sell require report decide pull return explain hope develop carry break receive agree support hit produce
eat cover catch draw choose cause point listen realize place close involve increase reduce measure compute
store load train test sample generate schedule allocate release stream answer cook clean paint travel""".split()
ADJECTIVES = """good new first last long great little own other old right big high different small large next
early young important few public bad same able late hard major better economic strong possible whole free
military true federal international full special easy clear recent certain personal open red difficult
available likely short single medical current wrong private past foreign fine common poor natural
significant similar hot dead central happy serious ready simple left physical general environmental
financial blue democratic dark various entire close legal religious cold final main green nice huge
popular traditional cultural quick slow quiet loud bright warm fast empty busy careful gentle honest
modern ancient famous rich heavy light deep wide narrow sharp soft sweet bitter fresh clean dirty""".split()
ADVERBS = """up so out just now how then also here well only very even back there down still in as too when
never really most often however again almost always later yet together quickly slowly already soon ever
usually perhaps finally sometimes probably certainly actually suddenly carefully easily nearly""".split()
FUNCTION = """the of and to a in that it for on with as at by from this but or an will would there their what
about which when one all can if no more some could them other into than its only over such our also after
first two new because any these us most where many those while should each through might must before
every between without under since during within along among across behind beyond""".split()
NAMES = """Alice Bob Carol David Emma Frank Grace Henry Iris Jack Kate Leo Maria Noah Olivia Paul Quinn Rosa Sam
Tara Uma Victor Wendy Xavier Yara Zoe London Paris Tokyo Berlin Madrid Rome Cairo Lima Oslo Seoul Monday
Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June July August
September October November December English French German Spanish Python Linux""".split()
CODE = [
    "def main():", "return None", "import torch", "for i in range(10):", "if x is None:", "print(x)",
    "self.value = value", "class Model:", "x = y + 1", "while True:", "except ValueError as e:",
    "{\"key\": \"value\"}", "[1, 2, 3]", "(a, b)", "a == b", "x != y", "n >= 0", "# comment", "// note",
    "http://localhost:8000/v1", "user@example.com", "C:\\\\path\\\\file.txt", "<div>text</div>", "a_b_c",
]


def _inflect(word: str, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:
        return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")
    if r < 0.25:
        return word + ("d" if word.endswith("e") else "ed")
    if r < 0.33:
        return (word[:-1] if word.endswith("e") and len(word) > 2 else word) + "ing"
    if r < 0.38:
        return word + "ly"
    if r < 0.42:
        return word + "er"
    return word


def _sentence(rng: random.Random) -> str:
    pools = (NOUNS, VERBS, ADJECTIVES, ADVERBS, FUNCTION, FUNCTION, NOUNS, NAMES)
    words = []
    for _ in range(rng.randint(4, 18)):
        pool = rng.choice(pools)
        word = rng.choice(pool)
        if pool is not FUNCTION and pool is not NAMES:
            word = _inflect(word, rng)
        words.append(word)
    r = rng.random()
    if r < 0.1:
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 10 ** rng.randint(1, 6))))
    elif r < 0.15:
        words.insert(rng.randrange(len(words)), f"{rng.randint(0, 99)}.{rng.randint(0, 99)}%")
    text = " ".join(words)
    text = text[0].upper() + text[1:]
    if rng.random() < 0.2:
        cut = rng.randrange(1, len(words))
        text = " ".join(text.split(" ")[:cut]) + ", " + " ".join(text.split(" ")[cut:])
    return text + rng.choice([".", ".", ".", "?", "!", ":", ";", "..."])


def corpus(num_lines: int = 30000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        r = rng.random()
        if r < 0.08:
            lines.append("    " * rng.randint(0, 2) + rng.choice(CODE))
        elif r < 0.12:
            lines.append(f"{rng.choice(NAMES)}: \"{_sentence(rng)}\" {rng.choice(['she said', 'he asked', 'they wrote'])}.")
        else:
            lines.append(" ".join(_sentence(rng) for _ in range(rng.randint(1, 4))))
    return lines


def build(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"the corpus yields {tok.get_vocab_size()} tokens, not {VOCAB_SIZE}: make it larger")
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    # Plain encoding adds the BOS, as Llama's tokenizers do; chat prompts get it from the template.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    build(Path(__file__).resolve().parent)
    print(f"wrote {Path(__file__).resolve().parent}/tokenizer.json and tokenizer_config.json")
