"""Preflight notes that need no model: what the config and this machine alone can tell."""



def test_half_precision_on_a_cpu_without_native_kernels_is_warned_about_in_one_line(monkeypatch):
    import torch

    from tokcomp.preflight import half_precision_cpu_note

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    note = half_precision_cpu_note("bfloat16", "cpu")
    assert note is not None and "model.dtype=bfloat16" in note and "AVX2" in note and "\n" not in note
    assert half_precision_cpu_note("float32", "cpu") is None
    assert half_precision_cpu_note("bfloat16", "cuda") is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert half_precision_cpu_note("bfloat16", "cpu") is None
