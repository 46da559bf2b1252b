"""bench.peer_steps: official / ours per step from hand-made records, by a measure both sides
have."""

from bench import peer_steps
from bench.peer_steps import rows_of


def test_a_steady_rate_is_never_compared_with_a_whole_run():
  records = [
      # official: the whole run only (3 s over 100 steps); ours: both
      {"side": "official", "ipc": 1, "seed": 0, "distill_cpu_s": 3.0},
      {"side": "ours", "ipc": 1, "seed": 0, "distill_cpu_s": 2.0, "steady_cpu_s_per_step": 0.01},
      # ipc 10: both sides steady (two official seeds averaged), so steady wins
      {"side": "official", "ipc": 10, "seed": 0, "steady_cpu_s_per_step": 0.2,
       "distill_cpu_s": 30.0},
      {"side": "official", "ipc": 10, "seed": 1, "steady_cpu_s_per_step": 0.4},
      {"side": "ours", "ipc": 10, "seed": 0, "steady_cpu_s_per_step": 0.1},
      {"side": "ours_variant", "ipc": 10, "seed": 0, "steady_cpu_s_per_step": 9.0},
  ]
  rows = {r["ipc"]: r for r in rows_of("dm", records, {"steps": 100})}
  assert rows[1]["measured"] == "run"
  assert rows[1]["official_over_ours"] == (3.0 / 100) / (2.0 / 100)
  assert rows[10]["measured"] == "steady"
  assert abs(rows[10]["official_over_ours"] - 0.3 / 0.1) < 1e-12
  assert rows[10]["seeds"] == "2/1"


def test_a_side_without_any_time_gives_no_row():
  records = [{"side": "official", "ipc": 1, "distill_cpu_s": 3.0}, {"side": "ours", "ipc": 1}]
  assert rows_of("dm", records, {"steps": 100}) == []


def test_record_files_keep_a_method_name_with_underscores(tmp_path):
  for name in ("krr_st_mnist.json", "dm_mnist.json", "dm_mnist.md", "notes.json"):
    (tmp_path / name).write_text("{}")
  files = peer_steps.record_files(str(tmp_path))
  assert sorted(files) == ["dm", "krr_st"]
