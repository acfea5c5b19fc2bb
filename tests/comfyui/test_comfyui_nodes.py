"""The node classes as ComfyUI registered them."""

from __future__ import annotations


def _node(name: str):
    import nodes  # ComfyUI's registry, filled by the `pack` fixture's load

    return nodes.NODE_CLASS_MAPPINGS[name], nodes.NODE_DISPLAY_NAME_MAPPINGS[name]


def _inputs(node_class) -> dict:
    return {entry.id: entry for entry in node_class.GET_SCHEMA().inputs}


def test_both_nodes_are_registered_with_the_full_dense_backend_list(pack):
    basic, basic_name = _node("AttentionBackend")
    advanced, advanced_name = _node("AttentionBackendAdvanced")
    assert (basic_name, advanced_name) == ("Attention Backend", "Attention Backend (Advanced)")
    inputs = _inputs(basic)
    dense = [name for name in pack.attention.names() if name not in pack.attention.sparse_names()]
    assert inputs["backend"].options == ["auto", "auto_tuned"] + dense
    assert inputs["on_unsupported"].options == ["fall back", "stop"]
    for node_class in (basic, advanced):
        schema = node_class.GET_SCHEMA()
        assert schema.category == "model_patches/attention"
        assert all(entry.tooltip for entry in schema.inputs)
        assert [output.io_type for output in schema.outputs] == ["MODEL"]


def test_advanced_validation_names_unknown_backends(pack):
    advanced, _ = _node("AttentionBackendAdvanced")
    assert advanced.validate_inputs(priority="flash4 > sage > sdpa") is True
    message = advanced.validate_inputs(priority="flash5 > sdpa")
    assert "flash5" in message and "flash4" in message  # names the typo and a close match
    # A priority wired from another node is not known yet at validation time.
    assert advanced.validate_inputs(priority=None) is True


def test_routing_rules_name_their_problems(pack):
    rules = pack.nodes.routing.RoutingRules
    assert rules(step_start=0.1, step_end=0.9, first_blocks=2).problems() == []
    assert "step window" in rules(step_start=0.8, step_end=0.2).problems()[0]


def test_fall_back_and_stop_priorities(pack):
    resolve = pack.nodes.patch.resolve_priority
    parse = pack.attention.parse_priority
    assert resolve(["sage"], "fall back") == (parse("sage > auto"), False)
    assert resolve("auto", "fall back") == (parse("auto"), False)
    assert resolve("auto_tuned > sdpa", "fall back") == (parse("auto_tuned > sdpa > auto"), False)
    assert resolve("flash4, sdpa", "stop") == (parse("flash4 > sdpa"), True)
