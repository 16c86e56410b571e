"""The demo of tuneline: the generator of the demo data in data/ and the synthetic benchmark lines.

A package of its own, apart from the library core: no core module imports it (the `tuneline
demo-data` command and the benchmarks do), and its literal content (intents, replies, sentences,
names, the planted dirt) lives in YAML files under `content/`, installed with the package so that
`tuneline demo-data` works from any install. Modules:

- content.py: the content files, validated;
- messages.py: user messages, the registry that keeps kept messages distinct, the eval sets;
- general.py: the canary set and the general corpus;
- planting.py: the raw partitions, clean records and every planted defect;
- fakes.py: made-up credentials, emails, phone numbers, tool-call ids and logs the plants carry;
- guarantees.py: the checks every generated data set passes before it is written;
- generator.py: the files, the answer key, the data README; `python -m tuneline.demo`;
- synthetic.py: synthetic lines for the data-plane benchmark.
"""
