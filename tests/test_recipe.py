"""The training recipe end to end on tiny data: a run stopped mid-way and resumed ends with exactly the weights
of a run that was never stopped (lookahead's average, the optimizer, the schedule and the loader's epoch all come
back from the checkpoint), and the parts of the recipe change what they should."""
import lightning as L
import pytest
import torch
from conftest import ROOT

from cifar10.config import load_config
from cifar10.trainer import fit

SMOKE = ROOT/'conf'/'smoke.yaml'


class Stop(RuntimeError):
    "Raised to stop a run at the start of an epoch, as a crash would."


class StopAtThirdEpoch(L.Callback):
    "Stops the run as its third epoch starts: its last checkpoint holds the first two."
    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == 2: raise Stop('stopped on purpose')


def config(tiny_data, tmp_path, name: str, **training):
    return load_config(SMOKE, {'data': {'data_dir': str(tiny_data), 'subset': None},
                               'training': {'max_epochs': 4, 'models_dir': str(tmp_path/'models'), **training},
                               'logging': {'tracking_uri': f'sqlite:///{tmp_path}/mlflow.db', 'run_name': name}})


def weights(run_folder) -> dict:
    return torch.load(run_folder/'last.ckpt', weights_only=True)['state_dict']


def test_a_resumed_run_ends_where_an_unbroken_one_does(tiny_data, tmp_path):
    unbroken = fit(config(tiny_data, tmp_path, 'unbroken'))
    with pytest.raises(Stop): fit(config(tiny_data, tmp_path, 'broken'), callbacks=[StopAtThirdEpoch()])
    stopped = torch.load(tmp_path/'models'/'broken'/'last.ckpt', weights_only=True)
    assert stopped['epoch'] == 1 and any('Lookahead' in key for key in stopped['callbacks'])  # its average is saved
    resumed = fit(config(tiny_data, tmp_path, 'broken'), resume=True)
    expected, got = weights(unbroken.folder), weights(resumed.folder)
    assert expected.keys() == got.keys()
    for key in expected: torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert resumed.test_metrics == unbroken.test_metrics


def test_lookahead_changes_the_final_weights(tiny_data, tmp_path):
    "With lookahead the run ends on the average of its weights: not the weights a run without it ends on."
    with_it = weights(fit(config(tiny_data, tmp_path, 'with')).folder)
    without = weights(fit(config(tiny_data, tmp_path, 'without', lookahead_every=0)).folder)
    assert not torch.equal(with_it['net.head.weight'], without['net.head.weight'])
    # the whitening filters come from the same images either way; the frozen batch norm scales stay at 1
    torch.testing.assert_close(with_it['net.stem.weight'], without['net.stem.weight'])
    assert (with_it['net.blocks.0.norm1.weight'] == 1).all()
