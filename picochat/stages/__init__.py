"""
The stages: the verbs a user runs as `picochat <stage>` (picochat/__main__.py maps names to modules).

A stage parses its flags, wires library parts (model, optimizer, data, tokenizer, checkpoint, engine, evaluators,
tasks, all in the picochat package above) into a job, and reports. Stages import only downward: the library
never imports a stage and no stage imports another (tests/test_layering.py checks both).
"""
