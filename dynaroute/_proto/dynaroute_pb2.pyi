from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("quality", "max_flops", "target_accuracy", "subnet", "policy", "min_quality", "min_accuracy")
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    MAX_FLOPS_FIELD_NUMBER: _ClassVar[int]
    TARGET_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SUBNET_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MIN_QUALITY_FIELD_NUMBER: _ClassVar[int]
    MIN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    quality: float
    max_flops: float
    target_accuracy: float
    subnet: str
    policy: str
    min_quality: float
    min_accuracy: float
    def __init__(self, quality: _Optional[float] = ..., max_flops: _Optional[float] = ..., target_accuracy: _Optional[float] = ..., subnet: _Optional[str] = ..., policy: _Optional[str] = ..., min_quality: _Optional[float] = ..., min_accuracy: _Optional[float] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("model", "id", "tensor", "text", "budget")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    model: str
    id: str
    tensor: Tensor
    text: str
    budget: Budget
    def __init__(self, model: _Optional[str] = ..., id: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., text: _Optional[str] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class InferBatchRequest(_message.Message):
    __slots__ = ("model", "id", "tensor", "texts", "budget")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    model: str
    id: str
    tensor: Tensor
    texts: _containers.RepeatedScalarFieldContainer[str]
    budget: Budget
    def __init__(self, model: _Optional[str] = ..., id: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., texts: _Optional[_Iterable[str]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class InferBatchRow(_message.Message):
    __slots__ = ("reply", "error")
    REPLY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    reply: InferReply
    error: Error
    def __init__(self, reply: _Optional[_Union[InferReply, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class InferBatchReply(_message.Message):
    __slots__ = ("id", "model", "rows")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    rows: _containers.RepeatedCompositeFieldContainer[InferBatchRow]
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[InferBatchRow, _Mapping]]] = ...) -> None: ...

class Outputs(_message.Message):
    __slots__ = ("logits", "label", "label_name", "confidence")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    logits: _containers.RepeatedScalarFieldContainer[float]
    label: int
    label_name: str
    confidence: float
    def __init__(self, logits: _Optional[_Iterable[float]] = ..., label: _Optional[int] = ..., label_name: _Optional[str] = ..., confidence: _Optional[float] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("subnets", "weights", "escalations", "exit_depths", "fallbacks", "policy", "budget_out_of_reach", "budget_note", "budget_asked", "budget_got", "budget_lowered")
    SUBNETS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    ESCALATIONS_FIELD_NUMBER: _ClassVar[int]
    EXIT_DEPTHS_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_OUT_OF_REACH_FIELD_NUMBER: _ClassVar[int]
    BUDGET_NOTE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_ASKED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_GOT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_LOWERED_FIELD_NUMBER: _ClassVar[int]
    subnets: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    escalations: int
    exit_depths: _containers.RepeatedScalarFieldContainer[int]
    fallbacks: _containers.RepeatedScalarFieldContainer[str]
    policy: str
    budget_out_of_reach: bool
    budget_note: str
    budget_asked: CalibrationPoint
    budget_got: CalibrationPoint
    budget_lowered: bool
    def __init__(self, subnets: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ..., escalations: _Optional[int] = ..., exit_depths: _Optional[_Iterable[int]] = ..., fallbacks: _Optional[_Iterable[str]] = ..., policy: _Optional[str] = ..., budget_out_of_reach: _Optional[bool] = ..., budget_note: _Optional[str] = ..., budget_asked: _Optional[_Union[CalibrationPoint, _Mapping]] = ..., budget_got: _Optional[_Union[CalibrationPoint, _Mapping]] = ..., budget_lowered: _Optional[bool] = ...) -> None: ...

class Cost(_message.Message):
    __slots__ = ("router_flops", "expert_flops", "total_flops", "full_flops", "flops_ratio", "queue_seconds", "compute_seconds", "total_seconds")
    ROUTER_FLOPS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FLOPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FLOPS_FIELD_NUMBER: _ClassVar[int]
    FULL_FLOPS_FIELD_NUMBER: _ClassVar[int]
    FLOPS_RATIO_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    router_flops: int
    expert_flops: int
    total_flops: int
    full_flops: int
    flops_ratio: float
    queue_seconds: float
    compute_seconds: float
    total_seconds: float
    def __init__(self, router_flops: _Optional[int] = ..., expert_flops: _Optional[int] = ..., total_flops: _Optional[int] = ..., full_flops: _Optional[int] = ..., flops_ratio: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class InferReply(_message.Message):
    __slots__ = ("id", "model", "outputs", "route", "cost")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    outputs: Outputs
    route: Route
    cost: Cost
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., outputs: _Optional[_Union[Outputs, _Mapping]] = ..., route: _Optional[_Union[Route, _Mapping]] = ..., cost: _Optional[_Union[Cost, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "code_name", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    code_name: str
    message: str
    def __init__(self, code: _Optional[int] = ..., code_name: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class InferStreamReply(_message.Message):
    __slots__ = ("id", "reply", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    reply: InferReply
    error: Error
    def __init__(self, id: _Optional[str] = ..., reply: _Optional[_Union[InferReply, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("kind", "dtype", "shape", "max_length")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    kind: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    max_length: int
    def __init__(self, kind: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., max_length: _Optional[int] = ...) -> None: ...

class SubnetInfo(_message.Message):
    __slots__ = ("name", "width", "depth", "path", "flops", "params", "val_accuracy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    VAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    name: str
    width: float
    depth: int
    path: int
    flops: int
    params: int
    val_accuracy: float
    def __init__(self, name: _Optional[str] = ..., width: _Optional[float] = ..., depth: _Optional[int] = ..., path: _Optional[int] = ..., flops: _Optional[int] = ..., params: _Optional[int] = ..., val_accuracy: _Optional[float] = ...) -> None: ...

class CalibrationPoint(_message.Message):
    __slots__ = ("policy", "quality", "threshold", "expected_accuracy", "mean_flops", "flops_ratio")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MEAN_FLOPS_FIELD_NUMBER: _ClassVar[int]
    FLOPS_RATIO_FIELD_NUMBER: _ClassVar[int]
    policy: str
    quality: float
    threshold: float
    expected_accuracy: float
    mean_flops: float
    flops_ratio: float
    def __init__(self, policy: _Optional[str] = ..., quality: _Optional[float] = ..., threshold: _Optional[float] = ..., expected_accuracy: _Optional[float] = ..., mean_flops: _Optional[float] = ..., flops_ratio: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "task", "labels", "input", "subnets", "full_subnet", "full_flops", "router_flops", "calibration", "ready", "default_policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    SUBNETS_FIELD_NUMBER: _ClassVar[int]
    FULL_SUBNET_FIELD_NUMBER: _ClassVar[int]
    FULL_FLOPS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_FLOPS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    task: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    input: InputSpec
    subnets: _containers.RepeatedCompositeFieldContainer[SubnetInfo]
    full_subnet: str
    full_flops: int
    router_flops: int
    calibration: _containers.RepeatedCompositeFieldContainer[CalibrationPoint]
    ready: bool
    default_policy: str
    def __init__(self, name: _Optional[str] = ..., task: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., subnets: _Optional[_Iterable[_Union[SubnetInfo, _Mapping]]] = ..., full_subnet: _Optional[str] = ..., full_flops: _Optional[int] = ..., router_flops: _Optional[int] = ..., calibration: _Optional[_Iterable[_Union[CalibrationPoint, _Mapping]]] = ..., ready: _Optional[bool] = ..., default_policy: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsReply(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
