"""Named limits of the network library, with safe defaults (DESIGN §2 "Limits").

Every length read from the wire is compared with one of these before anything is
allocated. A node's settings build a ``Limits``; tests use the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Our default maximum P-DATA-TF PDU length announced in the Maximum Length
#: sub-item (PS3.8 D.1). 256 KiB keeps the per-PDU overhead small for big datasets.
DEFAULT_MAX_PDU = 262_144

#: Cap on fragment size when the peer announces 0 (unlimited) or a huge value.
SEND_PDU_CAP = 1_048_576


@dataclass(frozen=True, slots=True)
class Limits:
    max_pdu_length: int = DEFAULT_MAX_PDU  # the largest P-DATA-TF body we accept
    max_associate_pdu_length: int = 65_536  # A-ASSOCIATE-RQ/AC body cap
    max_command_set_length: int = 65_536  # a reassembled command set
    max_presentation_contexts: int = 128  # PS3.8 allows odd IDs 1..255
    max_associations: int = 64  # concurrent, per SCP process
    max_associations_per_calling_ae: int = 32
    send_pdu_cap: int = SEND_PDU_CAP
    # Minimum progress of an incoming data set (catalogue RX-03): once one has been
    # arriving for ``min_rate_grace`` seconds, its average since its C-STORE-RQ must be
    # at least ``min_dataset_rate`` bytes/s (0: no minimum), or the association is
    # aborted. The per-PDU deadline cannot see a peer that sends many tiny complete PDUs
    # just inside the idle timeout, holding its slot for ever. 1 KiB/s keeps a
    # legitimate slow WAN link (a 512 KiB CT slice takes 8 minutes at that rate) served.
    min_dataset_rate: int = 1024
    min_rate_grace: float = 60.0
