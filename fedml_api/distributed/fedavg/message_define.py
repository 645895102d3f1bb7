"""Message types and parameter keys of the FedAvg protocol.

Start: every client sends ``C2S_CLIENT_READY`` once it has loaded its data; the server
starts the first round when all have (or ``--startup_timeout`` passed).
Round protocol: the server sends ``S2C_SYNC_MODEL_TO_CLIENT`` (global model) to the
round's sampled clients, each answers ``C2S_SEND_MODEL_TO_SERVER`` (its trained state
and sample number); on test rounds the server sends ``S2C_TEST_MODEL`` to every client,
each answers ``C2S_SEND_TEST_RESULT``; at the end the server sends ``S2C_FINISH``
(``finalize``: whether the ranks may end with MPI_Finalize, i.e. no peer was lost).
Failure: a client whose code raised sends ``C2S_CLIENT_FAILED`` (``error``: what
raised), waits for the server's ``S2C_FINISH`` (so the report is not lost) and exits.

Algorithms (``--federated_optimizer``): the train message carries the round's config
(``config``: the algorithm's name and its per-client values); when the algorithm sends
a client extra tensors, ``S2C_ROUND_TENSORS`` carries them just before the train
message; a client whose algorithm part returns extra tensors sends them as
``C2S_UPDATE_TENSORS`` just before its update, whose ``metadata`` holds the part's plain
values. (Extra tensors travel in their own message so that the model's messages keep
the model's layout: received in place, lent on one host.) On test rounds, an algorithm's
extra tensors for a client's test (e.g. FedPer's personal layers) come the same way,
just before the test message, whose ``config`` then holds the algorithm's test config.

A trainer's own client state (``ModelTrainer.get_client_state``): the server sends a
client the state it keeps for it as ``S2C_CLIENT_STATE`` just before the train message
(none for a client without one), and a client whose trainer returned one sends it as
``C2S_CLIENT_STATE`` just before its update. A trainer without client state sends and
receives neither.

Worker processes (``--worker_processes P``): processes 1..P are workers that serve the
CLIENT_NUM clients. At start each worker counts the samples of its share of the clients
(client ``c`` belongs to worker ``(c - 1) % P + 1``) and sends ``C2S_WORKER_READY``
(``sample_numbers``: client -> [train, test]; ``failures``: client -> why it could not
be counted). Each round the server sends every worker with clients to train
``S2C_TRAIN_CLIENTS`` (the global model; ``clients``: their ids; ``configs``: client ->
the algorithm's config; ``partial_sum``: whether to fold them). A worker trains them one
after another and answers ``C2S_CLIENTS_TRAINED`` (``failures`` and ``rejected``:
client -> reason; ``seconds``: the whole assignment), which carries the partial sum of
the clients it folded (``clients``; weighted by the sample numbers it reported at
start; see fedml_core/aggregation/partial_sums.py); without
``partial_sum``, each client's update goes first as ``C2S_SEND_MODEL_TO_SERVER`` with
its ``client``. Per-host combining (see host_combining.py): ``C2S_WORKER_READY`` also
carries the worker's ``host``; in a train phase with partial sums, the server tells
each peer ``combine_to`` (its host's combiner) and each combiner ``combine_from`` (peer
-> the clients assigned to it), both with ``combine_seconds`` (how long the combiner
waits for the peers' sums; null: until they arrive or are known lost). A peer sends its
partial sum as ``W2W_PARTIAL_SUM`` (``clients``) to its combiner, then its
``C2S_CLIENTS_TRAINED`` without the sum; the combiner's carries the host's sum
(``clients``: every client folded) and ``missing`` (peer -> why its sum is not in it).
The server sends a combiner ``S2C_PEER_LOST`` (``worker``, ``error``) when it gives up
on one of its peers before the combiner has answered. Test rounds: ``S2C_TEST_CLIENTS`` (the model, ``clients``), answered by
``C2S_CLIENTS_TESTED`` (``results``: client -> {result, sample_number}; ``failures``).
Extra tensors and client states travel per client, as above, each message with its
``client``: before the assignment to the worker, and before each client's update or,
with ``partial_sum``, after each client's training (kept by the server only for the
clients whose updates were used).
JSON keys are strings: client ids travel as ``"17"``.
"""


class MyMessage:
    # server -> client
    MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT = 1
    MSG_TYPE_S2C_TEST_MODEL = 2
    MSG_TYPE_S2C_FINISH = 3
    MSG_TYPE_S2C_ROUND_TENSORS = 4
    MSG_TYPE_S2C_TRAIN_CLIENTS = 5
    MSG_TYPE_S2C_TEST_CLIENTS = 6
    MSG_TYPE_S2C_PEER_LOST = 7
    MSG_TYPE_S2C_CLIENT_STATE = 8

    # client -> server
    MSG_TYPE_C2S_CLIENT_READY = 10
    MSG_TYPE_C2S_SEND_MODEL_TO_SERVER = 11
    MSG_TYPE_C2S_SEND_TEST_RESULT = 12
    MSG_TYPE_C2S_CLIENT_FAILED = 13
    MSG_TYPE_C2S_UPDATE_TENSORS = 14
    MSG_TYPE_C2S_WORKER_READY = 15
    MSG_TYPE_C2S_CLIENTS_TRAINED = 16
    MSG_TYPE_C2S_CLIENTS_TESTED = 17
    MSG_TYPE_C2S_CLIENT_STATE = 18

    # worker -> worker
    MSG_TYPE_W2W_PARTIAL_SUM = 20

    # params
    MSG_ARG_KEY_ROUND_INDEX = "round_idx"
    MSG_ARG_KEY_NUM_SAMPLES = "num_samples"
    MSG_ARG_KEY_TRAIN_SECONDS = "train_seconds"
    MSG_ARG_KEY_TEST_RESULT = "test_result"
    MSG_ARG_KEY_TEST_SECONDS = "test_seconds"
    MSG_ARG_KEY_ERROR = "error"
    MSG_ARG_KEY_FINALIZE = "finalize"
    MSG_ARG_KEY_CONFIG = "config"
    MSG_ARG_KEY_METADATA = "metadata"
    MSG_ARG_KEY_CLIENT = "client"
    MSG_ARG_KEY_CLIENTS = "clients"
    MSG_ARG_KEY_CONFIGS = "configs"
    MSG_ARG_KEY_PARTIAL_SUM = "partial_sum"
    MSG_ARG_KEY_SAMPLE_NUMBERS = "sample_numbers"
    MSG_ARG_KEY_FAILURES = "failures"
    MSG_ARG_KEY_REJECTED = "rejected"
    MSG_ARG_KEY_SECONDS = "seconds"
    MSG_ARG_KEY_RESULTS = "results"
    MSG_ARG_KEY_HOST = "host"
    MSG_ARG_KEY_COMBINE_TO = "combine_to"
    MSG_ARG_KEY_COMBINE_FROM = "combine_from"
    MSG_ARG_KEY_COMBINE_SECONDS = "combine_seconds"
    MSG_ARG_KEY_MISSING = "missing"
    MSG_ARG_KEY_WORKER = "worker"
