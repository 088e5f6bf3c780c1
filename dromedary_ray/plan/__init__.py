"""The run planner (`dromedary plan`): resources, memory per GPU, fit, nodes, hours and cost of a
config's stages, on paper. Pure Python, no Ray or torch.

    specs.py       models.yaml and gpus.yaml: model shapes, GPU specs, model spec -> shape
    memory.py      bytes per GPU: ZeRO model states, activations, vLLM weights and KV cache
    throughput.py  decode bound by memory bandwidth, prefill and training by FLOPs
    stages.py      STAGE_KINDS: what each stage runs on (the table to extend)
    workload.py    how much each stage generates and trains on
    cluster.py     the GPU pools of a Ray autoscaler YAML or KubeRay manifest
    planner.py     build_plan(config, cluster=..., gpu=...) -> Plan
    report.py      the plan as a table or JSON
"""
