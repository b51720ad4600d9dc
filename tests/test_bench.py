"""benchmarks/bench.py end to end on a tiny model: it runs both paths and reports consistent figures."""
import json

import pytest

from benchmarks.bench import main


@pytest.mark.parametrize('path', ['multistep', 'per-timestep'])
def test_bench_reports_the_figures_it_promises(path, capsys):
    main(['--timesteps', '2', '--batch_size', '1', '--img_size', '16', '--steps', '1', '--eval_batches', '1',
          '--path', path, '--threads', '2'])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ('step_s', 'solo_step_s', 'bound_step_s', 'eval_img_per_s', 'import_rss_mb', 'peak_rss_mb',
                'floor_peak_rss_mb'):
        assert result[key] > 0, key
    assert result['path'] == path and result['timesteps'] == 2
    assert result['import_rss_mb'] <= result['framework_rss_mb'] <= result['peak_rss_mb'] <= result['floor_peak_rss_mb']
    assert result['step_over_bound'] == pytest.approx(result['step_s'] / result['bound_step_s'], abs=2e-3)
