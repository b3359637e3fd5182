"""A user's mistake in the Python API gets a message about what the user chose."""
import warnings

import pytest
import torch

import lipnext


def test_an_image_size_without_a_default_patch_size_names_the_choices():
    with pytest.raises(ValueError, match=r"image size 30x30 has no default patch size .* pass "
                                         r"patch_size=, one of \[1, 2, 3, 5, 6, 10, 15, 30\]"):
        lipnext.create_model("lipnext_l4w64", image_size=30)
    with pytest.raises(ValueError, match=r"patch_size 4 does not divide the image size 30x30"):
        lipnext.create_model("lipnext_l4w64", image_size=30, patch_size=4)
    assert lipnext.create_model("lipnext_l4w64", image_size=30, patch_size=5).image_size == (30, 30)


@pytest.mark.parametrize("name", ["lipnext_l4w64", "liresnet_l7w64", "bronet_l6w96"])
def test_zero_input_channels_are_refused(name):
    with pytest.raises(ValueError, match="in_chans must be a positive number of input channels, got 0"):
        lipnext.create_model(name, in_chans=0)


def test_pixels_in_0_255_draw_a_warning():
    model = lipnext.create_model("lipnext_l4w64", image_size=8, patch_size=2)
    x = torch.rand(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"far outside \[0, 1\].*divide 0..255 pixels by 255"):
        model(255 * x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(torch.full((1, 3, 8, 8), float("inf")))
