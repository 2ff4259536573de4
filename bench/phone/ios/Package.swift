// swift-tools-version:5.9
// Times an exported .mlpackage with CoreML on macOS or an iOS device and writes the
// bench/common.py JSON schema (kind "mobile-ios"). See README.md.
import PackageDescription

let package = Package(
    name: "EdgesegBench",
    platforms: [.macOS(.v14), .iOS(.v17)],
    targets: [
        .executableTarget(name: "EdgesegBench", path: "Sources/EdgesegBench"),
    ]
)
