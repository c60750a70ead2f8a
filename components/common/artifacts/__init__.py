"""The artifacts components pass to one another, one module each: the files it holds, and how
they are written and read. A component reads another's artifact only through its module.

- :mod:`.validated_dataset`: validate_dataset's output (and generate_rationales', same shape);
- :mod:`.tokenized_dataset`: transform's output, made of :mod:`.token_dataset` folders;
- :mod:`.tuned_model`: tune's output, its checkpoint index and training log;
- :mod:`.evaluation_results`: evaluate's output.

A tuned model folder (a checkpoint, the selected model, a registered version) is laid out by
:mod:`components.common.model_loading`, which loads it, and the registry by
:mod:`components.common.model_registry`.
"""
