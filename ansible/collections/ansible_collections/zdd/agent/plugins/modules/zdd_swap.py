#!/usr/bin/python
# Copyright: the zdd-agent authors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: zdd_swap
short_description: Swap a systemd service to a version with zero failed requests
version_added: "0.1.0"
description:
  - Asks the zdd-agent on the host to swap O(service) to O(version) — start the
    new version beside the serving one on the same listening socket, admit it
    once ready, drain and retire the old one — and returns the agent's result.
  - Idempotent. The agent is asked first what the swap would do
    (C(zdd-agent swap --dry-run)); when O(version) already serves, nothing is
    done and the task reports no change.
  - When the new version fails (it exits, never becomes ready, or a hook
    fails) the agent rolls the service back to the version that served
    before, and this task fails with the agent's own message; the previous
    version keeps serving.
  - Runs the zdd-agent command line on the host, which goes through the
    zdd-agent daemon when it runs (see the C(zdd.agent.zdd_agent) role).
options:
  service:
    description: The service's name, as in C(/etc/zdd-agent/services/NAME.yaml).
    type: str
    required: true
  version:
    description:
      - The version to serve, as the service config's C(command) names it
        (its C({version}) placeholder).
    type: str
    required: true
  executable:
    description:
      - The zdd-agent command. Looked up in E(PATH) and in
        C(/opt/zdd-agent/bin) when not an absolute path.
    type: path
    default: zdd-agent
attributes:
  check_mode:
    support: full
    details: Reports the plan the agent would run (C(plan) in the result); starts nothing.
  diff_mode:
    support: full
    details: The serving version before and after.
  platform:
    platforms: posix
requirements:
  - zdd-agent installed on the managed host (role C(zdd.agent.zdd_agent)).
author:
  - zdd-agent authors
"""

EXAMPLES = r"""
- name: Swap api to v2
  zdd.agent.zdd_swap:
    service: api
    version: v2

- name: Swap with the agent from its virtualenv, and keep the result
  zdd.agent.zdd_swap:
    service: api
    version: "{{ api_version }}"
    executable: /opt/zdd-agent/bin/zdd-agent
  register: swap

- name: Show how long the drain took
  ansible.builtin.debug:
    msg: "{{ swap.swap.drain.seconds | default('no drain') }}"
"""

RETURN = r"""
service:
  description: The service's name.
  returned: always
  type: str
  sample: api
version:
  description: The version asked for.
  returned: always
  type: str
  sample: v2
previous_version:
  description: The version that served before the task (null on a first deploy).
  returned: always
  type: str
  sample: v1
plan:
  description: What the agent planned, from C(zdd-agent swap --dry-run --json)
    (batches of instances started and drained; empty when nothing to do).
  returned: always
  type: dict
swap:
  description:
    - The agent's swap result (C(zdd-agent swap --json)), also when the swap
      failed. Keys include C(result) (ok; rolled_back, exit 4, before any old
      instance was signalled; failed, exit 10, after it, when the old version
      was restarted), C(reason), C(seconds), C(phases), C(evidence) (what admitted
      each new instance), C(bake) (its seconds and each instance's new
      connections), C(drain) (connections at start and end, seconds, cut at
      grace, how the old instance closed them), C(warnings), C(watch) (the
      daemon's watch of the new version), C(tcp) (kernel counter deltas) and
      C(journal) (the new version's last log lines when it failed).
  returned: when a swap ran
  type: dict
  sample:
    result: ok
    from_version: v1
    to_version: v2
    seconds: 0.41
rc:
  description: The agent's exit code (4 when the new version failed and was rolled back).
  returned: when a command ran
  type: int
"""

import json
import os

from ansible.module_utils.basic import AnsibleModule

SEARCH = ["/opt/zdd-agent/bin"]
ARGUMENT_SPEC = dict(
    service=dict(type="str", required=True),
    version=dict(type="str", required=True),
    executable=dict(type="path", default="zdd-agent"),
)


def run_agent(module, exe, args):
    """One zdd-agent call with --json: (rc, parsed stdout or None, stderr)."""
    rc, out, err = module.run_command([exe] + args + ["--json"])
    try:
        data = json.loads(out) if out.strip() else None
    except ValueError:
        data = None
    return rc, data, err


def agent_message(data, err):
    """The agent's own words for a failure."""
    if isinstance(data, dict):
        for key in ("error", "reason"):
            if data.get(key):
                return data[key]
    text = (err or "").strip()
    return text.splitlines()[-1] if text else "zdd-agent failed without a message"


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    service, version = module.params["service"], module.params["version"]
    exe = module.params["executable"]
    if not os.path.isabs(exe):
        exe = module.get_bin_path(exe, required=True, opt_dirs=SEARCH)
    result = dict(changed=False, service=service, version=version)

    rc, plan, err = run_agent(module, exe, ["swap", service, "--version", version, "--dry-run"])
    if rc != 0 or not isinstance(plan, dict):
        module.fail_json(msg=agent_message(plan, err), rc=rc, **result)
    result["plan"] = plan
    result["previous_version"] = plan.get("from_version")
    if not plan.get("batches"):
        module.exit_json(**result)

    result["changed"] = True
    result["diff"] = dict(before="version: %s\n" % (plan.get("from_version") or "(none)"),
                          after="version: %s\n" % version,
                          before_header="%s (serving)" % service,
                          after_header="%s (after the swap)" % service)
    if module.check_mode:
        module.exit_json(**result)

    rc, swap, err = run_agent(module, exe, ["swap", service, "--version", version])
    result["rc"] = rc
    if isinstance(swap, dict) and "to_version" in swap:
        result["swap"] = swap
    if rc != 0:
        result["changed"] = False  # rolled back, or refused: the serving version did not change
        module.fail_json(msg="swap of %s to %s failed: %s" % (service, version,
                                                             agent_message(swap, err)),
                         **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
