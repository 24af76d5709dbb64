import pytest

from fssjax import configlib


def test_parse_arg_types_and_flags():
  d = configlib.parse_arg("fold=1,shot=5,demo,backbone=resnet101,lr=0.5",
                          dict(fold=0, shot=1, demo=False, backbone="resnet50", lr=1e-3))
  assert d == dict(fold=1, shot=5, demo=True, backbone="resnet101", lr=0.5)


def test_parse_arg_unknown_key_names_it():
  with pytest.raises(ValueError, match="'shots'.*known arguments"):
    configlib.parse_arg("shots=5", dict(shot=1))


def test_parse_arg_bad_type():
  with pytest.raises(ValueError, match="fold='x'"):
    configlib.parse_arg("fold=x", dict(fold=0))
