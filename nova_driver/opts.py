"""oslo.config options of the Nova driver: the ``[vmthunder]`` group of
nova.conf, exported through list_opts() (``oslo-config-generator
--namespace vmthunder.nova``).

Only oslo.config is imported here, so that the options can be listed
(and the sample config generated) without Nova installed.
"""

from __future__ import annotations

from oslo_config import cfg

GROUP = "vmthunder"

vmthunder_group = cfg.OptGroup(
    GROUP,
    title="vmthunder image backend",
    help="How the vmthunder compute driver "
         "(compute_driver = vmthunder.VMThunderLibvirtDriver) gets each "
         "instance's root disk from this host's vmthunder-agent.")

vmthunder_opts = [
    cfg.StrOpt(
        "agent_socket",
        default="/run/vmthunder/agent.sock",
        help="Unix socket of this host's vmthunder-agent API (its [agent] "
             "api_socket). nova-compute must be able to open it (the "
             "socket is mode 0660: run nova-compute as root or in the "
             "socket's group)."),
    cfg.FloatOpt(
        "agent_timeout",
        default=120.0,
        min=1.0,
        help="Seconds one call to the agent may take (attaching an image "
             "may wait for an iSCSI login) before it fails."),
    cfg.StrOpt(
        "origin_property",
        default="vmthunder_origin",
        help="Glance image property that names the image's vmthunder "
             "origin: export:NAME (an image `vmthunder export` published, "
             "resolved with the agent's [export] settings) or "
             "iscsi://[USER@]HOST[:PORT]/IQN/LUN. Set it when the image is "
             "exported, e.g. `openstack image set --property "
             "vmthunder_origin=export:debian-12 IMAGE`. It is never copied "
             "to the images instance snapshots create (also list it in "
             "[DEFAULT] non_inheritable_image_properties)."),
    cfg.StrOpt(
        "origin_template",
        help="Origin of an image that has no origin_property, built from "
             "the image: {image_id} and {image_name} are replaced, e.g. "
             "export:{image_id} when images are exported under their "
             "Glance ids. Unset: an image without the property has no "
             "vmthunder origin (see fallback_to_download)."),
    cfg.BoolOpt(
        "fallback_to_download",
        default=False,
        help="When an instance's image has no vmthunder origin, or the "
             "agent cannot be reached, give the instance an ordinary local "
             "root disk (Nova's download into the image cache and "
             "[libvirt] images_type) instead of failing the build. Off: "
             "the build fails with a fault saying what to do."),
    cfg.StrOpt(
        "nbd_transport",
        default="auto",
        choices=[
            ("auto", "whatever the agent serves the VM disks on (its "
                     "[agent] hypervisor_listen)"),
            ("unix", "a unix socket (the agent's default); refuse a "
                     "TCP agent"),
            ("tcp", "TCP on loopback; refuse a unix-socket agent"),
        ],
        help="How QEMU reaches an instance's root disk: the domain XML "
             "gets an NBD network disk on the agent's socket "
             "(<host transport='unix' socket=.../>) or on its loopback TCP "
             "port. The agent decides where it listens; this only checks "
             "that it is the expected kind."),
    cfg.StrOpt(
        "precache_trace_dir",
        help="Directory of recorded boot traces (vmthunder boot --trace, "
             "vmthunder serve --trace): when <dir>/<image id>.trace.gz "
             "(or .trace) exists, precaching the image (the compute API's "
             "image precache, cache_image) warms only the chunks that "
             "boot read; else the whole image."),
    cfg.FloatOpt(
        "precache_timeout",
        default=3600.0,
        min=0,
        help="Seconds cache_image (the image precache API) waits for the "
             "agent to finish warming an image before it reports an "
             "error; 0 starts the precache and returns at once."),
    cfg.BoolOpt(
        "precache_base",
        default=False,
        help="Pre-caching mode, for deployers who prefer local copies: "
             "instances get Nova's ordinary root disks ([libvirt] "
             "images_type: a qcow2 over the image's base file with the "
             "defaults), not vmthunder disks, and the base file "
             "(<instances_path>/_base/<sha1 of the image id>) is filled "
             "through this host's vmthunder-agent instead of downloaded "
             "from Glance: peers that hold the image first, its vmthunder "
             "origin last (the same origin rules as vmthunder disks), "
             "every chunk checked, so the origin sends each image once "
             "per swarm, not once per host. Applies to spawn and to the "
             "image precache API (cache_image), each fill bounded by "
             "precache_timeout (0: none); the base is written under "
             "a temporary name and renamed when complete. Instances that "
             "have vmthunder disks keep them. An image without a "
             "vmthunder origin, or an unreachable agent, is downloaded "
             "only with fallback_to_download."),
    cfg.BoolOpt(
        "cinder_origin",
        default=False,
        help="Boot an image that has no origin_property from a Cinder "
             "volume made from it: the image's read-only multiattach "
             "volume and its manifest (as `vmthunder export glance://ID "
             "--cinder` makes them), created on the first boot under a "
             "lock (coordination_url) so that a mass boot makes one volume, "
             "not one per host; later boots find it (the export sets the "
             "image's origin_property to cinder://VOLUME_ID). Cinder and "
             "Glance are reached with the [cinder] section of "
             "vmthunder_config_file. Takes precedence over "
             "origin_template."),
    cfg.StrOpt(
        "vmthunder_config_file",
        default="/etc/vmthunder/vmthunder.conf",
        help="vmthunder's config file on this host (the agent's): its "
             "[cinder] section says how to reach Cinder and Glance, its "
             "[coordination] backend_url is the lock's backend when "
             "coordination_url is unset. Read with cinder_origin only."),
    cfg.StrOpt(
        "coordination_url",
        help="tooz backend of the lock under which one compute host makes "
             "an image's Cinder volume (cinder_origin), the same URL on "
             "every host: redis://HOST:6379 or etcd3+http://HOST:2379. "
             "Unset: the agents' [coordination] backend_url from "
             "vmthunder_config_file. A file:// backend covers one host "
             "only."),
    cfg.FloatOpt(
        "cinder_lock_timeout",
        default=3600.0,
        min=1,
        help="Seconds a build waits for another host that is making the "
             "image's Cinder volume (cinder_origin: creating it from the "
             "image, then reading it once for its manifest) before it "
             "fails."),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(vmthunder_group)
    conf.register_opts(vmthunder_opts, group=vmthunder_group)


def list_opts():
    """Entry point for oslo-config-generator (oslo.config.opts:
    vmthunder.nova)."""
    return [(vmthunder_group, list(vmthunder_opts))]
