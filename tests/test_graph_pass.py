import pytest
import torch
import torchvision

from cbam_insert import CBAM, CBAMInsertError, find_sites, insert_cbam


def used(sites):
    return [s for s in sites if s.used]


@pytest.mark.parametrize(
    "name,after,expected",
    [
        ("resnet18", "block", 8),
        ("resnet18", "conv", 20),
        ("resnet50", "block", 16),
        ("mobilenet_v2", "block", 10),
        ("efficientnet_b0", "block", 9),
        ("convnext_tiny", "block", 18),
        ("resnet50", "stage", 4),
    ],
)
def test_site_counts_match_the_architectures(name, after, expected):
    model = torchvision.models.get_model(name, weights=None)
    assert len(used(find_sites(model, after=after))) == expected


def test_stage_sites_are_resnet_layers():
    names = [s.name for s in used(find_sites(torchvision.models.resnet18(), after="stage"))]
    assert names == ["layer1", "layer2", "layer3", "layer4"]


def test_identity_init_keeps_resnet50_logits():
    model = torchvision.models.resnet50().eval()
    patched = insert_cbam(model, after="block", init="identity").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(patched(x), model(x), atol=1e-5)
    assert sum(isinstance(m, CBAM) for m in patched.modules()) == 16


def test_original_state_dict_keys_are_kept():
    model = torchvision.models.resnet18()
    patched = insert_cbam(model, after="conv")
    before, after = model.state_dict(), patched.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v)
    assert all("cbam" in k for k in set(after) - set(before))


def test_no_site_error_names_working_placements():
    with pytest.raises(CBAMInsertError, match="placements that find sites here: conv"):
        insert_cbam(torchvision.models.vgg11(), after="block")
