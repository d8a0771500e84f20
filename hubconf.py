"""torch.hub entrypoints: `torch.hub.load(<checkout>, 'attnscale_small_12', source='local', pretrained=True)`.

Every registered variant is an entrypoint taking timm's keyword arguments. `pretrained=True` loads the released
weights of the four released variants as `timm.create_model` does (Hugging Face cache; HF_HUB_OFFLINE and
HF_HUB_CACHE apply); `checkpoint=<path>` loads a released, trained or exported checkpoint instead (safe loader,
strict key check).
"""
import models as _models

dependencies = ['torch', 'timm', 'huggingface_hub', 'safetensors']


def _entrypoint(name):
    def build(pretrained: bool = False, checkpoint: str = '', **kwargs):
        if pretrained and checkpoint:
            raise ValueError(f'{name}: pass pretrained=True or checkpoint=<path>, not both')
        model = _models.create_model(name, pretrained=pretrained, **kwargs)
        if checkpoint:
            _models.load_state_dict(model, _models.checkpoint.model_state(_models.load_checkpoint(checkpoint)),
                                    source=checkpoint)
        return model
    build.__name__ = name
    build.__doc__ = f'{name} (timm kwargs; pretrained=True for the released weights, checkpoint=<path> for a file)'
    return build


for _name in _models.list_variants():
    globals()[_name] = _entrypoint(_name)
