"""bingo.plots: a method looks the same in every figure, its reconstructed variant dashed."""

from bingo.plots import METHOD_STYLES, method_style


def test_reconstructed_and_variant_methods_share_their_base_colour():
    assert method_style("lamp") == METHOD_STYLES["lamp"]
    assert method_style("lamp+ls") == {**METHOD_STYLES["lamp"], "linestyle": "--"}
    variant = method_style("targeted-macs+ls")
    assert variant["color"] == METHOD_STYLES["targeted"]["color"]
    assert variant["marker"] != METHOD_STYLES["targeted"]["marker"]
    assert variant["linestyle"] == "--"
    assert method_style("unknown") == {}
    # magnitude-increase has a style of its own, not magnitude's
    assert method_style("magnitude-increase") == METHOD_STYLES["magnitude-increase"]
