"""SourceForm: one definition of the source forms, parsed once, mirrored by the C++ op's enum."""
import re
from pathlib import Path

import pytest
import torch

from fatezero_fast.ops.source import Source, SourceForm

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "blended_attention.h"


def test_cpp_enum_mirrors_source_form():
    text = HEADER.read_text()
    enum = re.search(r"enum SourceForm : int64_t \{([^}]*)\}", text).group(1)
    codes = {name: int(value) for name, value in re.findall(r"kSource(\w+) = (\d+)", enum)}
    assert codes == {"None": 0, "QK": 1, "Probs": 2, "LowRank": 3}
    assert {name.lower(): code for name, code in codes.items()} == \
        {form.name.lower(): int(form) for form in SourceForm}


def test_parse_each_form():
    q, k = torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8)
    assert Source.of(None).form is SourceForm.NONE
    assert Source.of(("qk", q, k)).b is k
    probs = Source.of(("probs", torch.rand(2, 1, 3, 6), torch.rand(2, 1, 3)))
    assert probs.form is SourceForm.PROBS and probs.row_scale is not None
    assert Source.of(("probs", torch.rand(2, 1, 3, 6))).row_scale is None
    assert Source.of(("lowrank", torch.rand(2, 1, 3, 2), torch.rand(2, 1, 2, 6))).form is SourceForm.LOWRANK
    assert SourceForm.named("qk") is SourceForm.QK and SourceForm.named(None) is SourceForm.NONE


@pytest.mark.parametrize("bad", [("full", 1), ("qk", 1), ("probs",), "qk", ()])
def test_bad_sources_are_refused(bad):
    with pytest.raises(ValueError, match="source"):
        Source.of(bad)
