"""A varied prompt set for training a feature-level draft head, built offline from what this machine has.

The draft head has to predict what the *verifier* writes, so its training data is the verifier's own
answers to prompts of the kinds users send: chat, writing, code, summarisation, answering from a
passage, translation, maths.  Nothing here comes from Spec-Bench (our benchmark): its questions stay
out of training and out of checkpoint selection.

Every prompt is ``{"id", "source", "family", "kind", "turns": [user message, optional follow-up]}``:

* ``source``: where its text comes from -- one of ``SOURCES`` (each a Debian package or a template set)
  or, added by ``head_data.py`` with the model, ``magpie`` (user turns the verifier writes itself from the
  bare start of a user message), ``verifier-passages`` (texts the verifier writes, then summarised and
  questioned) and ``long-passages`` (2-4 of those texts in one prompt of ~500-1,500 tokens: an article to
  summarise, or documents to answer from); ``long-documents`` are long sections of the Debian documents;
* ``family``: the template or document it was made from -- the unit of the held-out split (a whole
  family is either trained on or held out, never both), and no source or family holds more than
  ``MAX_SHARE`` of the set;
* ``kind``: the task (chat kinds, ``code``, ``summarization``, ``rag``, ``extraction``, ``translation``,
  ``math``), so every Spec-Bench category has its counterpart.

Near-duplicates (MinHash over word 5-grams, Jaccard >= 0.8) are removed.  The Debian packages are
``python3.11-doc fortunes fortunes-de fortunes-es fortunes-it debian-reference-en perl-doc`` and the man
pages already on the machine; a missing package's source is skipped with a warning.
"""
from __future__ import annotations

import ast
import random
import re
import zlib
from pathlib import Path

DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
FORTUNES = Path("/usr/share/games/fortunes")
MAN_PAGES = Path("/usr/share/man/man1")
PERL_POD = Path("/usr/share/perl/5.36.0/pod")
DEBIAN_REFERENCE = Path("/usr/share/doc/debian-reference-en/docs")
MAX_SHARE = 0.10  # no source and no family above this share of the prompts

TOPICS = """the water cycle; photosynthesis; black holes; the French Revolution; the printing press; vaccines;
climate change; plate tectonics; the Roman Empire; machine learning; the stock market; inflation; democracy;
the immune system; renewable energy; the internet; the Renaissance; DNA replication; volcanoes; the Cold War;
electric cars; the human brain; sleep; coffee; honeybees; the moon landing; ancient Egypt; the Industrial
Revolution; quantum computing; recycling; social media; the Great Depression; earthquakes; rainforests;
the Olympic Games; jazz music; impressionist painting; the theory of evolution; antibiotics; supply and demand;
cryptography; the solar system; ocean currents; migration of birds; the Silk Road; urban gardening;
remote work; public transport; the history of chess; artificial satellites; nuclear fusion; the Byzantine
Empire; coral reefs; minimalism; meditation; volunteering; personal finance; learning a new language;
time management; the Mediterranean diet; 3D printing; blockchain; the Apollo program; glaciers; the Amazon
river; Shakespeare's plays; Greek mythology; the Enlightenment; the human genome; wind turbines; smartphones;
video games; the history of tea; marathons; the periodic table; gravity; the speed of light; thunderstorms;
the ozone layer; the Magna Carta; the Ming dynasty; the Aztec civilization; the invention of the telephone;
open-source software; cloud computing; databases; operating systems; compilers; computer networks;
cybersecurity; the scientific method; statistics; probability; calculus; prime numbers; the Pythagorean
theorem; fractals; game theory; behavioural economics; urbanization; the gig economy; electric grids;
desalination; food waste; composting; the history of the bicycle; public libraries; museums; architecture
of cathedrals; modern dance; film noir; the Beatles; classical music; poetry; science fiction; mountaineering;
gardening; baking bread; dogs as pets; cats; whales; dinosaurs; the Arctic; deserts; the Sahara; the Alps""".replace("\n", " ")

PEOPLE = """Marie Curie; Isaac Newton; Ada Lovelace; Leonardo da Vinci; Nelson Mandela; Albert Einstein; Cleopatra;
Charles Darwin; Frida Kahlo; Alan Turing; Mahatma Gandhi; Jane Austen; Nikola Tesla; Galileo Galilei;
Florence Nightingale; Wolfgang Amadeus Mozart; Abraham Lincoln; Confucius; Rosa Parks; Johannes Gutenberg;
Queen Victoria; Ludwig van Beethoven; Simone de Beauvoir; Grace Hopper; Napoleon Bonaparte; Aristotle""".replace(
    "\n", " ")

ROLES = """a pirate captain; a medieval knight; a detective in 1920s London; a friendly robot; a tour guide in Rome;
a chef in a busy kitchen; an astronaut on Mars; a wise old wizard; a sports commentator; a museum curator;
a ship's cat; a time traveller from the year 3000; a lighthouse keeper; a librarian; a dragon guarding
treasure; a famous detective; a barista; a park ranger; a news anchor; a grumpy mountain troll""".replace("\n", " ")

WRITING = [
    "Write a short story about {topic}.", "Write a poem about {topic}.", "Write a blog post about {topic}.",
    "Write a persuasive essay on {topic}.", "Compose an email to a colleague about {topic}.",
    "Write a product description for a gadget related to {topic}.", "Draft a speech about {topic}.",
    "Write a haiku sequence about {topic}.", "Write a limerick about {topic}.",
    "Write a diary entry from someone who just learned about {topic}.",
    "Write an advertisement for a course on {topic}.", "Write a dialogue between two friends about {topic}.",
]
STEM = [
    "Explain {topic} in simple terms.", "How does {topic} work?", "What are the main causes of {topic}?",
    "Explain {topic} to a ten-year-old.", "What are the advantages and disadvantages of {topic}?",
    "Give me five interesting facts about {topic}.", "What is the history of {topic}?",
    "Why is {topic} important?", "Compare {topic} and {other}.", "What are common misconceptions about {topic}?",
    "Describe the key ideas behind {topic}.", "What would happen if {topic} disappeared?",
]
PEOPLE_T = ["Who was {person}?", "What were the main achievements of {person}?",
            "Write a short biography of {person}.", "What can we learn from the life of {person}?",
            "Imagine an interview with {person}. Write three questions and their answers."]
ROLEPLAY = ["Pretend you are {role}. Describe your typical day.", "You are {role}. Introduce yourself.",
            "Act as {role} and give advice to a newcomer.", "As {role}, tell me about your greatest adventure.",
            "Imagine you are {role}. How do you feel about {topic}?"]
REASONING = [
    "If all {a} are {b} and some {b} are {c}, can we conclude that some {a} are {c}? Explain.",
    "There are {n} people in a room and each shakes hands with every other person once. How many handshakes?",
    ("A train leaves at {h}:00 travelling at {s} km/h. Another leaves an hour later at {s2} km/h on the same "
     "track. When does the second catch up?"),
    "Which is heavier, a kilogram of {a} or a kilogram of {b}? Explain.",
    "What comes next in the sequence {seq}? Explain the pattern.",
]
MATH = [
    "{name} has {x} apples and buys {y} more, then gives away {z}. How many apples does {name} have now?",
    "A shop sells notebooks at ${x} each. {name} buys {y} notebooks and pays with a ${big} bill. How much change?",
    "A rectangle is {x} cm long and {y} cm wide. What are its area and perimeter?",
    "{name} reads {x} pages a day. How many days to finish a book of {big} pages?",
    "A car uses {x} litres of fuel per 100 km. How much fuel for a trip of {big} km?",
    "The price of a jacket is ${big}. It is discounted by {p}%. What is the new price?",
    "{name} saves ${x} every week. How many weeks to save ${big}?",
    "Solve for x: {x}x + {y} = {big}.", "What is {x} multiplied by {y}, plus {z}?",
    "A class has {big} students and {p}% of them passed the exam. How many passed?",
]
QA = ["What is the capital of {country}?", "What language is spoken in {country}?",
      "What is {topic}?", "Name three famous landmarks in {country}.", "What is {country} known for?",
      "When was {topic} first discovered or invented?", "How many continents are there and what are they?",
      "What is the tallest mountain in {country}?", "What currency does {country} use?"]
COUNTRIES = ["France", "Japan", "Brazil", "Kenya", "Canada", "Australia", "India", "Germany", "Mexico", "Egypt", "Norway", "Argentina", "Vietnam", "Italy", "Spain", "Peru", "Morocco", "Thailand", "Poland", "New Zealand", "Chile", "Ireland", "Greece"]
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Ines", "Jack", "Lena", "Marco", "Nora", "Omar", "Paula", "Ravi", "Sara", "Tom"]
CODE_T = [
    "Explain what this Python function does:\n\n```python\n{src}\n```",
    "Write a docstring for this function:\n\n```python\n{src}\n```",
    "Add type hints to this function and explain your choices:\n\n```python\n{src}\n```",
    "Write unit tests with pytest for this function:\n\n```python\n{src}\n```",
    "Rewrite this function so that it is easier to read:\n\n```python\n{src}\n```",
    "Are there any bugs or edge cases in this function?\n\n```python\n{src}\n```",
]
CODE_TASK = ["Write a Python function that {task}.", "Implement a function in Python which {task}.",
             "Show me Python code that {task}, with comments.", "How would I write a function that {task}?",
             "Write a JavaScript function that {task}.", "Write a C function that {task}."]
TASKS = """reverses a string; checks whether a number is prime; counts the words in a text file; merges two
sorted lists; finds the largest element of a list; removes duplicates from a list while keeping order;
computes the factorial of n; returns the n-th Fibonacci number; parses a date string; converts Celsius to
Fahrenheit; flattens a nested list; finds the most common word in a sentence; validates an email address;
reads a CSV file into a list of dictionaries; computes the average of a list; sorts a list of dictionaries by
a key; implements binary search; checks whether two strings are anagrams; rotates a matrix by 90 degrees;
implements a stack with push and pop; downloads a web page and counts its links; groups words by their first
letter; computes the greatest common divisor; generates all permutations of a list; converts a number to Roman
numerals; implements a simple LRU cache; checks balanced parentheses; finds the median of a list; compresses a
string with run-length encoding; counts vowels in a string""".replace("\n", " ")
SUMMARY_T = ["Summarize the following text in a few sentences:\n\n{passage}",
             "Give a short summary of this passage:\n\n{passage}",
             "{passage}\n\nSummarize the text above in one paragraph.",
             "Write a TL;DR for the following documentation:\n\n{passage}",
             "Summarize the key points of this text as a bulleted list:\n\n{passage}"]
RAG_T = ["Answer the question using only the passage.\n\nPassage:\n{passage}\n\nQuestion: {question}",
         "{passage}\n\nBased on the text above, {question_lc}",
         "Read the document and answer.\n\nDocument:\n{passage}\n\nQuestion: {question}"]
EXTRACT_T = ["List every technical term mentioned in this text:\n\n{passage}",
             ("Extract the names of all functions, classes and modules mentioned in this text, as a JSON list:"
              "\n\n{passage}"),
             "Extract the main claims of this passage as a numbered list:\n\n{passage}"]
TRANSLATE_T = ["Translate the following German text into English:\n\n{de}",
               "Please translate this into English:\n{de}", "German: {de}\nEnglish translation:",
               "What does this German text mean in English?\n\n{de}"]
QUOTE_T = ["Explain the meaning of this quote:\n\n{quote}", "Do you agree with this saying? Why?\n\n{quote}"]
FOLLOW_UPS = ["Can you make your answer shorter?", "Now explain it to a ten-year-old.",
              "Give me three more examples.", "Rewrite your answer as a bulleted list.",
              "Can you add more detail to the second point?", "Summarize your answer in one sentence.",
              "Write a title for your answer.", "What are the limitations of what you said?",
              "Now rewrite it in a more formal tone.", "Can you give a concrete example?",
              "Translate your answer into simple English for a beginner.",
              "Rewrite it without using the letter 'e' where possible."]


MATH_MORE = [
    ("{name} buys {x} packs of {y} pencils and shares them equally among {z} friends. How many pencils does each "
     "friend get, and how many are left over?"),
    ("A baker makes {big} cookies. She sells {p}% of them in the morning and half of the rest in the afternoon. "
     "How many cookies are left?"),
    "{name} is {x} years old. {name}'s mother is {y} years older than three times {name}'s age. How old is she?",
    ("A farmer has {x} cows and {y} chickens. How many legs do the animals have in total? Show your "
     "reasoning step by step."),
    ("A tank holds {big} litres. It is filled at {x} litres per minute and drains at {z} litres per minute. "
     "How long does it take to fill the empty tank?"),
    ("{name} earns ${x} per hour and works {y} hours a week. After paying {p}% tax, how much does {name} keep "
     "each week?"),
    "The sum of two numbers is {big} and their difference is {x}. What are the two numbers?",
    ("A recipe needs {x} grams of flour for {z} people. How much flour is needed for {y} people? Round to the "
     "nearest gram."),
    ("A bus has {big} seats. On the first stop {x} people get on, on the second {y} get on and {z} get off. "
     "How many empty seats remain if the bus started empty?"),
    "What is {p}% of {big}, and what is {big} increased by {p}%?",
    "Convert {big} minutes into hours and minutes.",
    ("{name} runs {x} km on Monday, twice as far on Tuesday and {z} km less than Tuesday on Wednesday. "
     "How far did {name} run in total?"),
]
STEM_MORE = ["Write a short explanation of {topic} for a school newsletter.",
             "Summarize what scientists know about {topic}.", "What are three open questions about {topic}?",
             "How has {topic} changed over time?",
             "Teach me the basics of {topic} in five steps."]
CODE_MORE = [
    "Explain the time complexity of this function:\n\n```python\n{src}\n```",
    "Translate this Python function into JavaScript:\n\n```python\n{src}\n```",
    "Write a short usage example for this function:\n\n```python\n{src}\n```",
]
CODE_FOLLOW = ["Now add error handling.", "Can you write tests for it?", "Make it faster.",
               "Explain the code line by line."]
MATH_FOLLOW = ["Now solve the same problem if all the numbers were doubled.", "Explain each step more simply.",
               "Check your answer another way."]
TRANSLATE_FOLLOW = ["Now translate it into French.", "Explain any idioms in the original.",
                    "Give a more literal translation."]
TRANSLATE_T2 = {
    "de": TRANSLATE_T,
    "es": ["Translate the following Spanish text into English:\n\n{text}", "Spanish: {text}\nEnglish translation:",
           "Please translate this into English:\n{text}", "What does this Spanish text mean in English?\n\n{text}"],
    "it": ["Translate the following Italian text into English:\n\n{text}", "Italian: {text}\nEnglish translation:",
           "Please translate this into English:\n{text}", "What does this Italian text mean in English?\n\n{text}"],
}
PASSAGE_T = {"summarization": SUMMARY_T + ["Summarize this in two sentences:\n\n{passage}",
                                           "What is this text about? Answer briefly.\n\n{passage}"],
             "rag": RAG_T + ["Context:\n{passage}\n\nUsing the context, answer: {question}"],
             "extraction": EXTRACT_T + ["List the commands, options or names this text mentions:\n\n{passage}"]}
QUESTIONS = ["What does the passage say about {heading}?", "What is the purpose of {heading}?",
             "How is {heading} used, according to the text?", "What is the main point of the passage?",
             "What problem does {heading} solve?", "What should a beginner know about {heading}, based on the text?",
             "Which details in the text matter most for {heading}?"]
# The Magpie trick with a nudge: the user turn starts with one of these words (or nothing) and the
# verifier writes the rest of the request.  Each seed is a family.
MAGPIE_SEEDS = ["", "", "", "Write", "Explain", "How", "What", "Why", "Can you", "Give me", "Create", "Describe",
                "Help me", "Compare", "List", "Solve", "Calculate", "Summarize", "Translate", "I need", "Tell me",
                "Write a Python", "Suggest", "Is it", "Plan", "Rewrite", "Generate", "Which"]
# Texts the verifier writes (sampled) and is later asked to summarise or answer from: news-like prose that
# no Debian package has.  Each genre is a family.
PASSAGE_GENRES = ["Write a news report about {topic}.", "Write a short encyclopedia article about {topic}.",
                  "Write a product review of something related to {topic}.",
                  "Write a meeting summary for a team working on {topic}.",
                  "Write a letter to a newspaper editor about {topic}.",
                  "Write a short story about {topic}.", "Write an interview with an expert on {topic}.",
                  "Write a press release announcing a discovery about {topic}."]


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(";") if t.strip()]


def _sections(text: str, heading_re: str, min_chars: int, max_chars: int) -> list[tuple[str, str]]:
    parts = re.split(heading_re, text)
    out = []
    for i in range(1, len(parts) - 1, 2):
        heading, body = parts[i].strip(), re.sub(r"\n{3,}", "\n\n", parts[i + 1]).strip()
        if len(body) >= min_chars:
            out.append((heading, body[:max_chars].rsplit("\n", 1)[0] if len(body) > max_chars else body))
    return out


def rst_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    text = re.sub(r"^\.\. [^\n]*(\n   [^\n]*)*", "", text, flags=re.MULTILINE)  # directives and their options
    return re.sub(r":[a-z:]+:`~?([^`<]+?)(?: <[^>]+>)?`", r"\1", text)  # :func:`x` -> x


def man_text(path: Path) -> str:
    """A man page's roff source as plain text (headings as '== NAME' lines): good enough to read."""
    import gzip

    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            raw = f.read()
    else:
        raw = path.read_text(encoding="utf-8", errors="replace")
    lines = []
    for line in raw.splitlines():
        if line.startswith((".SH", ".SS")):
            lines.append("\n== " + line[3:].strip().strip('"') + "\n")
        elif line.startswith((".B ", ".I ", ".BR ", ".IR ", ".BI ", ".RB ", ".IB ", ".RI ")):
            lines.append(re.sub(r'"', "", line.split(" ", 1)[1]))
        elif line.startswith((".", "'")):
            if line.startswith((".PP", ".P", ".LP", ".TP", ".IP", ".sp")):
                lines.append("")
            continue
        else:
            lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\\f[BIRP]|\\f\[[A-Z]*\]|\\&|\\\(em|\\\(en", "", text)
    text = text.replace("\\-", "-").replace("\\(aq", "'").replace("\\(dq", '"').replace("\\e", "\\")
    return re.sub(r"\\[(*][a-zA-Z]{1,2}|\\.", "", text)


def pod_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    text = re.sub(r"^=head\d\s+(.*)$", r"\n== \1\n", text, flags=re.MULTILINE)
    text = re.sub(r"^=(over|back|item|pod|cut|for|begin|end|encoding)[^\n]*$", "", text, flags=re.MULTILINE)
    for _ in range(3):
        text = re.sub(r"[CBIFLESX]<<+\s*(.*?)\s*>>+|[CBIFLESX]<([^<>]*)>", lambda m: m.group(1) or m.group(2) or "",
                      text)
    return text


def html_text(path: Path) -> str:
    import html

    text = path.read_text(encoding="utf-8", errors="replace")
    text = re.sub(r"(?s)<(script|style)\b.*?</\1>", "", text)
    text = re.sub(r"(?s)<h[1-4][^>]*>(.*?)</h[1-4]>", lambda m: "\n== " + re.sub("<[^>]+>", "", m.group(1)) + "\n",
                  text)
    text = re.sub(r"<(p|div|br|li|tr|pre)\b[^>]*>", "\n", text)
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


DOC_KINDS = {  # source -> (files, text extractor, section heading pattern, sections per file)
    "python-docs": (lambda: sorted(DOC_SOURCES.rglob("*.rst.txt")), rst_text, r"\n([^\n]+)\n[=\-~^*]{3,}\n", 6),
    "manpages": (lambda: sorted(MAN_PAGES.glob("*.1*")), man_text, r"\n== ([^\n]+)\n", 2),
    "perl-doc": (lambda: sorted(PERL_POD.glob("*.pod")), pod_text, r"\n== ([^\n]+)\n", 12),
    "debian-reference": (lambda: sorted(DEBIAN_REFERENCE.glob("*.en.html")), html_text, r"\n== ([^\n]+)\n", 200),
}


def passages(source: str, rng: random.Random, count: int, min_chars: int = 400,
             max_chars: int = 2000) -> list[tuple[str, str, str]]:
    """(file, heading, passage) from one documentation source, a few sections of each file."""
    files_of, extract, heading_re, per_file = DOC_KINDS[source]
    files = files_of()
    rng.shuffle(files)
    out: list[tuple[str, str, str]] = []
    for f in files:
        try:
            secs = _sections("\n" + extract(f), heading_re, min_chars, max_chars)
        except (OSError, EOFError, ValueError):
            continue
        rng.shuffle(secs)
        out += [(f.name, h, b) for h, b in secs[:per_file] if sum(c.isalpha() for c in b) > 0.5 * len(b)]
        if len(out) >= count:
            break
    return out[:count]


def fortune_files(lang: str) -> list[Path]:
    if lang == "en":
        italian = {p.name for p in (FORTUNES / "it").iterdir()} if (FORTUNES / "it").is_dir() else set()
        return [p for p in sorted(FORTUNES.iterdir()) if p.is_file() and not p.suffix and p.name not in italian
                and "art" not in p.name and p.name not in ("banner", "translate-me")]
    folder = FORTUNES / lang
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.iterdir()) if p.is_file() and (not p.suffix or p.suffix == ".fortunes")
            and "art" not in p.name]


def fortunes(lang: str, rng: random.Random, count: int, max_lines: int = 6) -> list[tuple[str, str]]:
    """(file, text) items of one language's fortunes."""
    items: list[tuple[str, str]] = []
    for f in fortune_files(lang):
        for chunk in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            chunk = chunk.strip()
            if 20 < len(chunk) < 600 and chunk.count("\n") < max_lines:
                items.append((f.name, chunk))
    rng.shuffle(items)
    return items[:count]


def python_files(where: str) -> list[Path]:
    """The standard library's modules (``stdlib``) or third-party packages' (``site``), tests left out."""
    import sysconfig

    if where == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(root.glob("*.py")) + sorted(root.glob("*/*.py"))
    else:
        root = Path(sysconfig.get_paths()["purelib"])
        files = sorted(root.glob("*/*.py")) + sorted(root.glob("*/*/*.py"))
    return [p for p in files if not any("test" in part for part in p.relative_to(root).parts)]


def python_functions(where: str, rng: random.Random, count: int, min_lines: int = 5,
                     max_lines: int = 40) -> list[tuple[str, str, str]]:
    """(module path, source, first docstring line) of functions of ``python_files(where)``."""
    import textwrap

    files = python_files(where)
    rng.shuffle(files)
    out: list[tuple[str, str, str]] = []
    for f in files:
        try:
            src = f.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = src.splitlines()
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.end_lineno:
                n = node.end_lineno - node.lineno + 1
                if min_lines <= n <= max_lines:
                    body = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno]))
                    doc = (ast.get_docstring(node) or "").strip().split("\n")[0]
                    found.append(("/".join(f.parts[-2:]), body, doc))
        rng.shuffle(found)
        out += found[:6]  # a few per module: many modules, not a few big ones
        if len(out) >= count:
            break
    return out[:count]


def _family(source: str, template: list[str], text_template: str) -> str:
    return f"{source}/t{template.index(text_template)}"


def templated(rng: random.Random, counts: dict[str, int]) -> list[dict]:
    """Prompts of the template sources (source = ``template-<kind>``, family = the template)."""
    topics, people, roles, tasks = _split(TOPICS), _split(PEOPLE), _split(ROLES), _split(TASKS)
    out: list[dict] = []

    def add(kind: str, templates: list[str], text: str, t: str, source: str | None = None) -> None:
        source = source or f"template-{kind}"
        out.append({"source": source, "family": _family(source, templates, t), "kind": kind, "turns": [text]})

    stem = STEM + STEM_MORE
    for _ in range(counts.get("stem", 0)):
        t = rng.choice(stem)
        a, b = rng.sample(topics, 2)
        add("stem", stem, t.format(topic=a, other=b), t)
    for _ in range(counts.get("writing", 0)):
        t = rng.choice(WRITING)
        add("writing", WRITING, t.format(topic=rng.choice(topics)), t)
    for _ in range(counts.get("humanities", 0)):
        t = rng.choice(PEOPLE_T)
        add("humanities", PEOPLE_T, t.format(person=rng.choice(people)), t)
    for _ in range(counts.get("roleplay", 0)):
        t = rng.choice(ROLEPLAY)
        add("roleplay", ROLEPLAY, t.format(role=rng.choice(roles), topic=rng.choice(topics)), t)
    for _ in range(counts.get("reasoning", 0)):
        t = rng.choice(REASONING)
        a, b, c = rng.sample(["cats", "dogs", "birds", "mammals", "animals", "pets", "feathers", "bricks", "robots",
                              "poets", "teachers", "engineers", "apples", "fruits", "stones"], 3)
        start = rng.randint(1, 9)
        seq = ", ".join(str(start * (i + 1) ** rng.choice([1, 2])) for i in range(5))
        add("reasoning", REASONING, t.format(a=a, b=b, c=c, n=rng.randint(4, 30), h=rng.randint(6, 11),
                                             s=rng.randint(50, 90), s2=rng.randint(95, 160), seq=seq), t)
    maths = MATH + MATH_MORE
    for _ in range(counts.get("math", 0)):
        t = rng.choice(maths)
        x, y, z = rng.randint(2, 60), rng.randint(2, 40), rng.randint(1, 20)
        add("math", maths, t.format(name=rng.choice(NAMES), x=x, y=y, z=min(z, x + y), big=rng.randint(100, 900),
                                    p=rng.choice([10, 15, 20, 25, 30, 40, 60, 75])), t)
    for _ in range(counts.get("qa", 0)):
        t = rng.choice(QA)
        add("qa", QA, t.format(country=rng.choice(COUNTRIES), topic=rng.choice(topics)), t)
    for _ in range(counts.get("code", 0)):
        t = rng.choice(CODE_TASK)
        add("code", CODE_TASK, t.format(task=rng.choice(tasks)), t)
    return out


def documents(rng: random.Random, source: str, count: int) -> list[dict]:
    """Summarise / answer from / extract from passages of a documentation source (family = the document)."""
    out = []
    for i, (fname, heading, body) in enumerate(passages(source, rng, count)):
        kind = ("summarization", "rag", "extraction")[i % 3] if i % 7 else "rag"
        t = rng.choice(PASSAGE_T[kind])
        q = rng.choice(QUESTIONS).format(heading=heading.strip("= ")[:80])
        text = t.format(passage=body, question=q, question_lc=q[0].lower() + q[1:])
        out.append({"source": source, "family": f"{source}/{fname}", "kind": kind, "turns": [text]})
    return out


def passage_prompts(rng: random.Random, items: list[dict]) -> list[dict]:
    """Prompts over texts the verifier wrote (``items``: {"family", "text", "topic"})."""
    out = []
    for i, it in enumerate(items):
        kind = ("summarization", "rag", "summarization", "extraction", "rag")[i % 5]
        t = rng.choice(PASSAGE_T[kind])
        q = rng.choice(QUESTIONS).format(heading=it["topic"])
        text = t.format(passage=it["text"], question=q, question_lc=q[0].lower() + q[1:])
        out.append({"source": "verifier-passages", "family": it["family"], "kind": kind, "turns": [text]})
    return out


# Long prompts (~500-1,500 tokens), the length of real summarisation and retrieval prompts: an article to summarise
# made of several passages of one genre, or a question over several retrieved documents, the answer in one of them.
# The head must learn to copy from far back in the prompt, which passages of 120-320 tokens never ask of it.
LONG_SUMMARY_T = ["Summarize: {text}", "Summarize the following article:\n\n{text}",
                  "{text}\n\nWrite a short summary of the article above.",
                  "Give the main points of this article in three sentences:\n\n{text}",
                  "Article:\n{text}\n\nSummary:"]
LONG_RAG_T = ["{documents}\n\nAnswer the question using the documents above.\nQuestion: {question}",
              "Use the following documents to answer the question.\n\n{documents}\n\nQuestion: {question}",
              "Question: {question}\n\n{documents}\n\nAnswer the question based on these documents."]
LONG_DOC_T = ["Document [{i}] (Title: {title})\n{text}", "[{i}] {title}\n{text}", "Title: {title}\n{text}"]


def long_passage_prompts(rng: random.Random, items: list[dict], count: int) -> list[dict]:
    """``count`` long prompts over the verifier's own passages (``items``: {"family", "text", "topic"}), each
    joining 2-4 of them: half summarisation (one genre, read as one article), half RAG (one question about
    one document among others; family: the question's genre)."""
    by_family: dict[str, list[dict]] = {}
    for it in items:
        by_family.setdefault(it["family"], []).append(it)
    families = sorted(f for f, v in by_family.items() if len(v) >= 4)
    out = []
    for i in range(count if families else 0):
        n = rng.randint(2, 4)
        if i % 2 == 0:
            family = rng.choice(families)
            parts = rng.sample(by_family[family], n)
            text = rng.choice(LONG_SUMMARY_T).format(text="\n\n".join(p["text"] for p in parts))
            kind = "summarization"
        else:
            parts = rng.sample(items, n)
            family = parts[0]["family"]
            doc_t = rng.choice(LONG_DOC_T)
            docs = [doc_t.format(i=j + 1, title=p["topic"], text=p["text"]) for j, p in enumerate(parts)]
            order = list(range(n))
            rng.shuffle(order)  # the document the question is about sits anywhere among them
            q = rng.choice(QUESTIONS).format(heading=parts[0]["topic"]).replace("the passage", "the documents")
            text = rng.choice(LONG_RAG_T).format(documents="\n\n".join(docs[j] for j in order), question=q)
            kind = "rag"
        out.append({"source": "long-passages", "family": "long-" + family, "kind": kind, "turns": [text]})
    return out


def long_documents(rng: random.Random, count: int) -> list[dict]:
    """Summarise / answer from long sections (2,500-4,500 characters) of the documentation sources."""
    out = []
    for source in DOC_KINDS:
        for i, (fname, heading, body) in enumerate(passages(source, rng, count, min_chars=2500, max_chars=4500)):
            kind = ("summarization", "rag")[i % 2]
            q = rng.choice(QUESTIONS).format(heading=heading.strip("= ")[:80])
            t = rng.choice(LONG_SUMMARY_T if kind == "summarization" else PASSAGE_T["rag"])
            text = t.format(text=body, passage=body, question=q, question_lc=q[0].lower() + q[1:])
            out.append({"source": "long-documents", "family": f"long-documents/{source}/{fname}", "kind": kind,
                        "turns": [text]})
    return out


def build(seed: int = 0, scale: float = 1.0) -> list[dict]:
    """The prompts of every offline source (``magpie`` and ``verifier-passages`` are added by head_data.py,
    which needs the model), before near-duplicate removal and share caps (``finish``)."""
    rng = random.Random(seed)

    def n(x: int) -> int:
        return max(1, int(x * scale))

    out = templated(rng, {"stem": n(2000), "writing": n(1800), "humanities": n(600), "roleplay": n(1000),
                          "reasoning": n(900), "math": n(2400), "qa": n(1400), "code": n(1200)})
    for source, count in (("python-docs", 2200), ("manpages", 2400), ("perl-doc", 1600), ("debian-reference", 700)):
        got = documents(rng, source, n(count))
        if not got:
            print(f"warning: no passages from {source} (is its Debian package installed?)")
        out += got
    for where, source in (("stdlib", "python-stdlib"), ("site", "python-packages")):
        for fname, src, doc in python_functions(where, rng, n(2500)):
            t = rng.choice(CODE_T + CODE_MORE)
            family = f"{source}/{fname}"
            out.append({"source": source, "family": family, "kind": "code", "turns": [t.format(src=src)]})
            if doc and len(doc) > 15 and rng.random() < 0.3:
                task = doc[0].lower() + doc[1:].rstrip(".")
                out.append({"source": source, "family": family, "kind": "code",
                            "turns": [f"Write a Python function that does the following: {task}."]})
    for lang, count in (("de", 2400), ("es", 900), ("it", 1200)):
        items = fortunes(lang, rng, n(count))
        if not items:
            print(f"warning: no fortunes in {lang} (is fortunes-{lang} installed?)")
        for fname, text in items:
            t = rng.choice(TRANSLATE_T2[lang])
            out.append({"source": f"fortunes-{lang}", "family": f"fortunes-{lang}/{fname}", "kind": "translation",
                        "turns": [t.format(de=text, text=text)]})
    for fname, quote in fortunes("en", rng, n(1500)):
        t = rng.choice(QUOTE_T + ["What is funny about this?\n\n{quote}", "Rewrite this in plain words:\n\n{quote}"])
        out.append({"source": "fortunes-en", "family": f"fortunes-en/{fname}", "kind": "quotes",
                    "turns": [t.format(quote=quote)]})
    # its own random stream: the prompts above come out as they did before these were added
    out += long_documents(random.Random(seed + 7), n(250))
    return out


def add_follow_ups(rng: random.Random, prompts: list[dict], share: float = 0.25) -> None:
    """A second user turn on ``share`` of the prompts (not extraction), sent after the verifier's first answer."""
    for p in prompts:
        if p["kind"] == "extraction" or len(p["turns"]) > 1 or rng.random() >= share:
            continue
        pool = {"code": CODE_FOLLOW + FOLLOW_UPS[:4], "math": MATH_FOLLOW, "translation": TRANSLATE_FOLLOW}.get(
            p["kind"], FOLLOW_UPS)
        p["turns"].append(rng.choice(pool))


def _shingles(text: str, n: int = 5) -> set[int]:
    # crc32, not hash(): str hashes change with every process, and the prompt list must come out the same on any
    # machine (kept answers are matched to it: head_data.py --keep)
    words = re.findall(r"\w+", text.lower())
    return {zlib.crc32(" ".join(words[i:i + n]).encode()) for i in range(max(1, len(words) - n + 1))}


def dedup(prompts: list[dict], threshold: float = 0.8, bands: int = 16, rows: int = 4) -> list[dict]:
    """Drop near-duplicates (MinHash LSH over word 5-grams, Jaccard >= threshold against a kept prompt)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.integers(1, 2**31 - 1, bands * rows, dtype=np.int64)
    b = rng.integers(0, 2**31 - 1, bands * rows, dtype=np.int64)
    prime = (1 << 61) - 1
    buckets: dict[tuple, list[int]] = {}
    kept: list[dict] = []
    kept_sets: list[set[int]] = []
    for p in prompts:
        sh = _shingles(p["turns"][0])
        h = np.array([x & 0x7FFFFFFF for x in sh], dtype=np.int64)
        sig = ((h[None, :] * a[:, None] + b[:, None]) % prime).min(1)
        keys = [(band, *sig[band * rows:(band + 1) * rows].tolist()) for band in range(bands)]
        dup = False
        for key in keys:
            for j in buckets.get(key, ()):
                other = kept_sets[j]
                if len(sh & other) / max(1, len(sh | other)) >= threshold:
                    dup = True
                    break
            if dup:
                break
        if dup:
            continue
        for key in keys:
            buckets.setdefault(key, []).append(len(kept))
        kept.append(p)
        kept_sets.append(sh)
    return kept


def cap_shares(prompts: list[dict], rng: random.Random, max_share: float = MAX_SHARE) -> list[dict]:
    """Drop prompts at random from any source or family above ``max_share`` of the final set."""
    import collections

    prompts = list(prompts)
    for key in ("source", "family"):
        for _ in range(10):  # dropping some shrinks the total: repeat until stable
            limit = int(max_share * len(prompts))
            counts = collections.Counter(p[key] for p in prompts)
            over = {k for k, c in counts.items() if c > limit}
            if not over:
                break
            rng.shuffle(prompts)
            seen: collections.Counter = collections.Counter()
            kept = []
            for p in prompts:
                seen[p[key]] += 1
                if p[key] not in over or seen[p[key]] <= limit:
                    kept.append(p)
            prompts = kept
    return prompts


def finish(prompts: list[dict], seed: int = 0) -> list[dict]:
    """Near-duplicates removed, follow-ups added, shares capped, ids given, shuffled."""
    rng = random.Random(seed + 1)
    prompts = cap_shares(dedup(prompts), rng)
    add_follow_ups(rng, prompts)
    rng.shuffle(prompts)
    for i, p in enumerate(prompts):
        p["id"] = f"{p['source']}-{i}"
    return prompts


if __name__ == "__main__":
    import collections
    import json
    import sys

    ps = finish(build())
    print(json.dumps(collections.Counter(p["source"] for p in ps), indent=0), len(ps), file=sys.stderr)
    for p in ps[:5]:
        print(json.dumps(p)[:300])
