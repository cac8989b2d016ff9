"""The package's public names: one consistent `__all__`, every error a user can meet among them."""

from __future__ import annotations

import inspect

import peft_softmix
from peft_softmix import errors


def test_every_name_in_all_exists_and_nothing_is_listed_twice():
    assert len(peft_softmix.__all__) == len(set(peft_softmix.__all__))
    assert [name for name in peft_softmix.__all__ if not hasattr(peft_softmix, name)] == []


def test_every_error_class_is_exported_from_the_package():
    classes = {name for name, obj in vars(errors).items() if inspect.isclass(obj) and issubclass(obj, Exception)}
    assert classes == set(errors.__all__)
    assert classes <= set(peft_softmix.__all__), classes - set(peft_softmix.__all__)
    # raised where they belong, defined once
    for name in classes:
        assert getattr(peft_softmix, name) is getattr(errors, name)


def test_the_training_api_is_exported():
    assert {"train_relation", "TrainingArguments", "RelationTrainer"} <= set(peft_softmix.__all__)
    assert "register" not in peft_softmix.__all__  # it runs at import
