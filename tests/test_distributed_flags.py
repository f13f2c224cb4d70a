"""core_jax.distributed: which environments count as multi-process, and what JAX is told."""

import jax
import pytest
from absl import flags

from core_jax import distributed

EXPLICIT = dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2)
SLURM_STEP = dict(
    SLURM_JOB_ID="123456",
    SLURM_STEP_NODELIST="gpu[007-008]",
    SLURM_NTASKS="2",
    SLURM_STEP_NUM_TASKS="2",
    SLURM_STEP_NUM_NODES="2",
    SLURM_NNODES="2",
    SLURM_PROCID="1",
    SLURM_LOCALID="0",
)


def test_no_cluster_is_single_process():
    assert distributed.detect_cluster({}, None) is None
    assert distributed.detect_cluster({"HOME": "/root", "PATH": "/bin"}, {}) is None


def test_explicit_flags_are_passed_and_autodetection_is_off():
    info = distributed.detect_cluster({}, EXPLICIT)
    assert info["kind"] == "explicit"
    assert info["init_kwargs"] == dict(EXPLICIT, cluster_detection_method="deactivate")
    assert (info["num_processes"], info["process_id"]) == (4, 2)


def test_explicit_flags_win_over_the_environment():
    env = dict(SLURM_STEP, TPU_WORKER_HOSTNAMES="a,b", CORE_JAX_DISTRIBUTED="off")
    assert distributed.detect_cluster(env, EXPLICIT)["kind"] == "explicit"


def test_one_explicit_process_does_not_initialise():
    flags_one = dict(coordinator_address="localhost:1", num_processes=1, process_id=0)
    assert distributed.detect_cluster({}, flags_one) is None


@pytest.mark.parametrize(
    "given, problem",
    [
        (dict(coordinator_address="h:1", num_processes=2), "--process_id"),
        (dict(num_processes=2, process_id=0), "--coordinator_address"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), r"\[0, 2\)"),
        (dict(coordinator_address="h:1", num_processes=0, process_id=0), "--num_processes must be"),
        (dict(coordinator_address="nohost", num_processes=2, process_id=0), "host:port"),
    ],
)
def test_inconsistent_flags_name_the_problem(given, problem):
    with pytest.raises(ValueError, match=problem):
        distributed.detect_cluster({}, given)


def test_coordinator_from_jax_env_with_counts_from_flags_or_env():
    env = {"JAX_COORDINATOR_ADDRESS": "head:9999"}
    info = distributed.detect_cluster(env, dict(num_processes=2, process_id=1))
    assert info["init_kwargs"]["coordinator_address"] == "head:9999"
    env.update(JAX_NUM_PROCESSES="3", JAX_PROCESS_ID="0")
    info = distributed.detect_cluster(env, {})
    assert (info["kind"], info["num_processes"], info["process_id"]) == ("explicit", 3, 0)
    # The address alone: JAX's own detection fills in the rest.
    assert distributed.detect_cluster({"JAX_COORDINATOR_ADDRESS": "h:1"}, {})["kind"] == "jax_env"


def test_tpu_pod_environments():
    info = distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3", "TPU_WORKER_ID": "1"})
    assert info == dict(kind="tpu", num_processes=4, process_id=None, init_kwargs={})
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "t0", "TPU_WORKER_ID": "0"}) is None
    multislice = {
        "TPU_WORKER_HOSTNAMES": "t0,t1",
        "MEGASCALE_NUM_SLICES": "2",
        "MEGASCALE_COORDINATOR_ADDRESS": "t0:8080",
    }
    assert distributed.detect_cluster(multislice)["num_processes"] == 4
    # One host per slice, two slices: still several processes.
    assert distributed.detect_cluster({"MEGASCALE_NUM_SLICES": "2"})["kind"] == "tpu"


def test_switch_env_forces_or_forbids():
    assert distributed.detect_cluster({"CORE_JAX_DISTRIBUTED": "auto"}) == dict(
        kind="forced", num_processes=None, process_id=None, init_kwargs={}
    )
    assert distributed.detect_cluster({"CORE_JAX_DISTRIBUTED": "off", "TPU_WORKER_HOSTNAMES": "a,b"}) is None
    with pytest.raises(ValueError, match="CORE_JAX_DISTRIBUTED"):
        distributed.detect_cluster({"CORE_JAX_DISTRIBUTED": "maybe"})


def test_slurm_one_task_per_node_agrees_with_jax_on_the_coordinator(monkeypatch):
    info = distributed.detect_cluster(SLURM_STEP, None)
    assert info["kind"] == "slurm"
    kwargs = info["init_kwargs"]
    assert (kwargs["num_processes"], kwargs["process_id"]) == (2, 1)
    # One process per node keeps all the node's GPUs: JAX's detection (which would pin GPU
    # SLURM_LOCALID) must be off, and the coordinator must be the one JAX itself would pick.
    assert kwargs["cluster_detection_method"] == "deactivate"
    from jax._src.clusters import slurm_cluster

    for key, value in SLURM_STEP.items():
        monkeypatch.setenv(key, value)
    expected = slurm_cluster.SlurmCluster.get_coordinator_address(None, None)
    assert kwargs["coordinator_address"] == expected
    assert expected.startswith("gpu007:")


def test_slurm_several_tasks_per_node_use_jax_detection():
    env = dict(SLURM_STEP, SLURM_STEP_NUM_TASKS="8", SLURM_NTASKS="8")
    info = distributed.detect_cluster(env)
    assert (info["kind"], info["init_kwargs"], info["num_processes"]) == ("slurm", {}, 8)


def test_slurm_batch_script_and_single_task_are_single_process():
    batch = {k: v for k, v in SLURM_STEP.items() if not k.startswith("SLURM_STEP")}
    batch["SLURM_NTASKS"] = "4"  # the batch shell sees the job's tasks but is one process
    assert distributed.detect_cluster(batch) is None
    one = dict(SLURM_STEP, SLURM_STEP_NUM_TASKS="1", SLURM_NTASKS="1")
    assert distributed.detect_cluster(one) is None


def test_open_mpi():
    info = distributed.detect_cluster({"OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_RANK": "2"})
    assert (info["kind"], info["num_processes"], info["process_id"]) == ("ompi", 3, 2)
    assert distributed.detect_cluster({"OMPI_COMM_WORLD_SIZE": "1"}) is None


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node001", "node001"),
        ("node001,host2", "node001"),
        ("node[001-015],host2", "node001"),
        ("node[007,009-015],h", "node007"),
        ("a-b[3]", "a-b3"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert distributed.first_slurm_host(nodelist) == first


def test_define_flags_twice_then_parse():
    fv = flags.FlagValues()
    distributed.define_flags(fv)
    distributed.define_flags(fv)  # a second module doing the same must not raise
    # Unparsed flags read as unset instead of raising.
    assert distributed.detect_cluster({}, fv) is None
    fv(["prog", "--coordinator_address=h:5", "--num_processes=2", "--process_id=1"])
    assert distributed.detect_cluster({}, fv)["init_kwargs"]["process_id"] == 1
    distributed.define_flags()
    distributed.define_flags()
    assert {"coordinator_address", "num_processes", "process_id"} <= set(flags.FLAGS)


@pytest.fixture
def fake_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed, "_initialized_here", False)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


def test_single_process_run_does_not_initialise(fake_initialize):
    assert distributed.maybe_initialize({}, {}) is False
    assert distributed.maybe_initialize(None, {"TPU_WORKER_HOSTNAMES": "only-one"}) is False
    assert fake_initialize == []


def test_multi_process_run_initialises_once(fake_initialize):
    assert distributed.maybe_initialize(EXPLICIT, {}) is True
    assert distributed.maybe_initialize(EXPLICIT, {}) is True
    assert fake_initialize == [dict(EXPLICIT, cluster_detection_method="deactivate")]


def test_tpu_run_initialises_without_arguments(fake_initialize):
    assert distributed.maybe_initialize({}, {"CORE_JAX_DISTRIBUTED": "auto"}) is True
    assert fake_initialize == [{}]


def test_cpu_collectives_option_exists_in_this_jax():
    # jax 0.10 and 0.12 both name it jax_cpu_collectives_implementation; gloo lets CPU processes
    # run cross-process collectives.
    assert distributed.enable_cpu_collectives() == "jax_cpu_collectives_implementation"
    assert jax.config.jax_cpu_collectives_implementation == "gloo"


def test_is_main_process_in_a_single_process_run():
    assert distributed.is_main_process()
