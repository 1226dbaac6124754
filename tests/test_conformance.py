"""Transformers' own common model tests on the SAR models, with plain ViT under the same tester as the control.

`ModelTesterMixin` and `ConfigTester` come from the source distribution of the installed Transformers
release (see `transformers_sdist.py`; the module skips, naming the reason, when the package registry
cannot be reached). The tester is ours, with the sizes and the pattern of Transformers' `ViTModelTester`
(tests/models/vit/test_modeling_vit.py, which the sdist does not ship), and the test classes repeat
what Transformers' `ViTModelTest` adds to the mixin: its overrides and its skips, for its reasons.
"""

import re
import unittest
from unittest import mock

import pytest
import transformers_sdist
from torch import nn
from transformers import ViTConfig, ViTForImageClassification, ViTModel
from transformers.models.auto import modeling_auto
from transformers.testing_utils import torch_device

from sar_hf import SARViTConfig, SARViTForImageClassification, SARViTModel

try:
    common, config_common = transformers_sdist.import_common_tests()
except transformers_sdist.SdistUnavailable as error:
    pytest.skip(str(error), allow_module_level=True)


# The config of Transformers' `ViTModelTester`.
VIT_TESTER_CONFIG = {
    "image_size": 30,
    "patch_size": 2,
    "num_channels": 3,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02,
    "encoder_stride": 2,
    "attn_implementation": "eager",
    "is_decoder": False,
}


class ViTFamilyModelTester:
    """Tiny configs and inputs for a ViT-family test class, with the sizes of `ViTModelTester`."""

    batch_size = 13
    is_training = True
    type_sequence_label_size = 10

    def __init__(self, parent, config_class=ViTConfig, config_settings=None):
        self.parent = parent
        self.config_class = config_class
        self.config_kwargs = {**VIT_TESTER_CONFIG, **(config_settings or {})}
        for name, value in VIT_TESTER_CONFIG.items():  # the common tests read the sizes from the tester
            setattr(self, name, value)
        num_patches = (self.image_size // self.patch_size) ** 2
        self.seq_length = num_patches + 1  # the patches and the [CLS] token
        # The common suite's SDPA-against-eager tests mask this many positions of a `mask_length` mask.
        self.num_masks = int(0.5 * self.seq_length)
        self.mask_length = num_patches

    def prepare_config_and_inputs(self):
        pixel_values = common.floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = common.ids_tensor([self.batch_size], self.type_sequence_label_size)
        return self.get_config(), pixel_values, labels

    def get_config(self):
        return self.config_class(**self.config_kwargs)

    def create_and_check_model(self, model_class, config, pixel_values, labels):
        model = model_class(config).to(torch_device).eval()
        result = model(pixel_values)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))

    def create_and_check_for_image_classification(self, model_class, config, pixel_values, labels):
        config.num_labels = self.type_sequence_label_size
        model = model_class(config).to(torch_device).eval()
        result = model(pixel_values, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.type_sequence_label_size))

        # greyscale images
        config.num_channels = 1
        model = model_class(config).to(torch_device).eval()
        pixel_values = common.floats_tensor([self.batch_size, 1, self.image_size, self.image_size])
        result = model(pixel_values)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.type_sequence_label_size))

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


# Half-precision variants of the common suite's eager-against-SDPA comparison.
HALF_PRECISION_KERNEL_COMPARISONS = re.compile(r"test_eager_matches_sdpa_inference_\d+_(fp16|bf16)_")


class ViTFamilyModelTest(common.ModelTesterMixin):
    """`ModelTesterMixin` as Transformers' `ViTModelTest` runs it, on a base model and a classifier.

    A subclass names them, their config class and its settings. The common suite treats some classes
    by name (which get labels, which are base models that it does not train); a subclass whose classes
    Transformers does not know lists their names in `built_in_names`, so that they are treated as the
    built-in classes they stand in for.
    """

    config_class = ViTConfig
    config_settings = {}
    base_model_class = ViTModel
    classifier_class = ViTForImageClassification
    all_model_classes = (ViTModel, ViTForImageClassification)  # what the common tests run on
    built_in_names = {}  # {name of a `transformers.models.auto.modeling_auto` mapping: {model_type: class name}}

    # As in `ViTModelTest`.
    test_resize_embeddings = False
    test_torch_exportable = True
    fx_compatible = False

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        for mapping, names in cls.built_in_names.items():
            patch = mock.patch.dict(getattr(modeling_auto, mapping), names)
            patch.start()
            cls.addClassCleanup(patch.stop)

    def setUp(self):
        # Not a skip of Transformers' ViT test, and the same for every class here, the control too: on
        # CI's two CPU cores these 16 of the 25 variants take about 90 s per Transformers release, for
        # ViT's attention kernels, which the SAR models run unchanged (the capture hands the kernel its
        # arguments untouched, and the fp32 variants, `output_attentions` included, run here).
        if HALF_PRECISION_KERNEL_COMPARISONS.match(self._testMethodName):
            self.skipTest("fp16/bf16 eager-against-SDPA kernel comparisons: left out to bound CI's time")
        self.model_tester = ViTFamilyModelTester(self, self.config_class, self.config_settings)
        self.config_tester = config_common.ConfigTester(
            self, config_class=self.config_class, has_text_modality=False, hidden_size=37, **self.config_settings
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="ViT does not use inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(
        reason="Transformers' ViT test skips it: since torch 2.3+cu121 it leaves later tests with "
        "`CUDA error: misaligned address` (it needs several GPUs anyway)."
    )
    def test_multi_gpu_data_parallel_forward(self):
        pass

    def test_model_get_set_embeddings(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), nn.Module)
            output_embeddings = model.get_output_embeddings()
            self.assertTrue(output_embeddings is None or isinstance(output_embeddings, nn.Linear))

    def test_model(self):
        self.model_tester.create_and_check_model(self.base_model_class, *self.model_tester.prepare_config_and_inputs())

    def test_for_image_classification(self):
        config_and_inputs = self.model_tester.prepare_config_and_inputs()
        self.model_tester.create_and_check_for_image_classification(self.classifier_class, *config_and_inputs)


class ViTControlTest(ViTFamilyModelTest, unittest.TestCase):
    """Plain ViT under the same tester: what the SAR models are held to."""


class SARViTModelTest(ViTFamilyModelTest, unittest.TestCase):
    config_class = SARViTConfig
    base_model_class = SARViTModel
    classifier_class = SARViTForImageClassification
    all_model_classes = (SARViTModel, SARViTForImageClassification)
    built_in_names = {
        "MODEL_MAPPING_NAMES": {"sar-vit": "SARViTModel"},
        "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": {"sar-vit": "SARViTForImageClassification"},
    }


class SARViTNoSkipNoNormModelTest(SARViTModelTest):
    """The classifier with the authors' last block; its encoder class is under the common tests above."""

    config_settings = {"sar_no_skip_no_norm": True}
    all_model_classes = (SARViTForImageClassification,)

    def test_retain_grad_hidden_states_attentions(self):
        # The common test backpropagates a logit of the classifier in training mode, called without labels:
        # a loss without the SAR term, which the capture's guard refuses (tests/test_capture.py). At λ = 0
        # there is no term to lose, and the common test passes.
        with pytest.raises(RuntimeError, match="This training pass's \\[CLS\\] scores were never used"):
            super().test_retain_grad_hidden_states_attentions()
        self.model_tester = ViTFamilyModelTester(self, self.config_class, {**self.config_settings, "sar_weight": 0.0})
        super().test_retain_grad_hidden_states_attentions()


def test_an_unreachable_registry_is_a_reason_to_skip(tmp_path, monkeypatch):
    """Without the registry the sdist cannot be had: `SdistUnavailable`, which skips this module, not an error."""
    monkeypatch.setattr(transformers_sdist, "CACHE", tmp_path)
    unreachable = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": ""}
    for name, value in unreachable.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(transformers_sdist.SdistUnavailable, match="pip download"):
        transformers_sdist.sdist_tests_folder()
    assert not any(tmp_path.rglob("*.py"))  # nothing half-unpacked for the next run to take
