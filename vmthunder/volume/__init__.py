"""Origin export and attach: iSCSI target/initiator, Cinder, os-brick."""
