"""The BIDS App ``brain-ldm-bids``: one concern per module.

=================  ==========================================================================
``errors``         the App's errors (each ends a run with one line) and ``one_line``
``dataset``        the pybids layer: layout, participant labels, real and preprocessed T1w
``columns``        which participants.tsv column holds which conditioning field; ``BidsConfig``
``participants``   participants.tsv -> one ``Participant`` (conditioning or skip reason) each
``sex_codes``      sex codes from participants.json ``Levels``
``naming``         output names: folders, image names, seeds, sidecars
``requests``       ``ImageRequest``, ``SweepPoint``, ``CounterfactualRequest``: one image each
``plan``           ``plan_images`` / ``plan_sweeps`` / ``plan_counterfactuals``
``resume``         what an existing output needs: ``assess``, ``refresh_sidecar``
``output_dir``     the output folder: locations, creation, stale and temporary files
``locks``          ``OutputLock``, ``ParticipantLocks``, SLURM submission records
``description``    ``dataset_description.json``, README, DOIs, ``DatasetLinks``
``workflow``       the App's Nipype graph and the image-by-image Linear plugin
``options``        command-line values checked and turned into settings
``logs``           where the App's lines go (stdout, Nipype's levels)
``progress``       progress lines, the summary, skipped participants grouped
``run``            the participant and group levels
``report``         the group level's table; ``report_html`` its page; ``figures`` its PNGs
=================  ==========================================================================

Importing this package imports none of them (``brain_ldm_nodes.cli.run`` is the entry point).
"""
