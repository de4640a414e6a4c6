from teacher_server.cli import main

raise SystemExit(main())
