"""torch.hub entrypoints: `torch.hub.load(<checkout>, 'attnscale_small_12', source='local')`.

Every registered variant is an entrypoint taking timm's keyword arguments; `checkpoint=<path>`
loads a released or trained checkpoint into it (safe loader, strict key check).
"""
import models as _models

dependencies = ['torch', 'timm']


def _entrypoint(name):
    def build(checkpoint: str = '', **kwargs):
        model = _models.create_model(name, **kwargs)
        if checkpoint:
            _models.load_state_dict(model, _models.checkpoint.model_state(_models.load_checkpoint(checkpoint)),
                                    source=checkpoint)
        return model
    build.__name__ = name
    build.__doc__ = f'{name} (timm kwargs; checkpoint=<path> to load weights)'
    return build


for _name in _models.list_variants():
    globals()[_name] = _entrypoint(_name)
