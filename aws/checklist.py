"""What seed 001's deployment checklist (deploy/checklist/ledger-deployment-checklist.md)
provisions in AWS, as it writes it: "CloudWatch log groups created" and "CloudWatch Alarms"
(the secrets' names are the settings', AWS_SECRET_IDS). tests/aws/ reads the checklist itself
and compares what `manage.py aws provision` made with it."""

NAMESPACE = "StackService"

LOG_GROUPS = (
    "/aws/ecs/stack-service",
    "/aws/ecs/stack-service/treasury",
    "/aws/ecs/stack-service/ledger",
)

# The metrics the alarms read (aws/selectors.py says what each value is).
DISCREPANCY_COUNT = "discrepancy_count"
WRITE_SUCCESS_RATE = "write_success_rate"
SYSTEM_BUFFER_USDC = "system_buffer_usdc"
CONVERSION_JOBS_FAILED = "conversion_jobs_failed"

# PutMetricAlarm's parameters. The checklist names no dimensions and no actions: the alarms
# read the metrics without dimensions, and the actions an operator attaches are kept.
ALARMS = (
    {
        "AlarmName": "ledger-high-discrepancy-rate",
        "ComparisonOperator": "GreaterThanThreshold",
        "EvaluationPeriods": 1,
        "MetricName": DISCREPANCY_COUNT,
        "Namespace": NAMESPACE,
        "Period": 300,
        "Statistic": "Sum",
        "Threshold": 10.0,
    },
    {
        "AlarmName": "ledger-write-failures",
        "ComparisonOperator": "LessThanThreshold",
        "EvaluationPeriods": 2,
        "MetricName": WRITE_SUCCESS_RATE,
        "Namespace": NAMESPACE,
        "Period": 300,
        "Statistic": "Average",
        "Threshold": 0.99,
    },
    {
        "AlarmName": "low-system-buffer",
        "ComparisonOperator": "LessThanThreshold",
        "EvaluationPeriods": 1,
        "MetricName": SYSTEM_BUFFER_USDC,
        "Namespace": NAMESPACE,
        "Period": 60,
        "Statistic": "Average",
        "Threshold": 5000.0,
    },
    {
        "AlarmName": "treasury-conversion-failures",
        "ComparisonOperator": "GreaterThanThreshold",
        "EvaluationPeriods": 1,
        "MetricName": CONVERSION_JOBS_FAILED,
        "Namespace": NAMESPACE,
        "Period": 300,
        "Statistic": "Sum",
        "Threshold": 5.0,
    },
)
