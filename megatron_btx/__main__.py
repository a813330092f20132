from megatron_btx.cli import main; import sys; sys.exit(main())
